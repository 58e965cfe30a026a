"""Production settings: `manage.py check --deploy` is clean with the environment the README documents,
and `make run`'s plain HTTP on 127.0.0.1 keeps working without it."""

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_production_exports() -> dict:
    """The `export` lines of the README's production commands (the block that runs `check --deploy`)."""
    readme = (ROOT / "README.md").read_text()
    [block] = [b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "manage.py check --deploy" in b]
    exports = {}
    for line in block.splitlines():
        if not line.startswith("export "):
            continue
        if "$(" in line:
            # The one command substitution is the README's way to make a secret key.
            name = line.removeprefix("export ").split("=", 1)[0]
            assert name == "SECRET_KEY" and "secrets.token_urlsafe(50)" in line, line
            exports[name] = secrets.token_urlsafe(50)
            continue
        for word in shlex.split(line.removeprefix("export "), comments=True):
            name, value = word.split("=", 1)
            exports[name] = value
    return exports


def production_env(tmp_path: Path, **extra: str) -> dict:
    """README.md "Production": the variables it sets, nothing inherited that could change the outcome."""
    env = {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "LANG", "SYSTEMROOT")}
    exports = readme_production_exports()
    assert {"DATABASE_URL", "SECRET_KEY", "ALLOWED_HOSTS", "BEHIND_TLS_PROXY"} <= set(exports), exports
    env.update({"PORTAL_VAR_DIR": str(tmp_path / "var"), **exports, **extra})
    return env


def manage(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def settings_of(env: dict, *names: str) -> dict:
    code = (
        "import json; from django.conf import settings;"
        f" print(json.dumps({{n: getattr(settings, n) for n in {list(names)!r}}}))"
    )
    result = manage(env, "shell", "-c", code)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_check_deploy_is_clean_with_the_documented_production_environment(tmp_path):
    result = manage(production_env(tmp_path), "check", "--deploy", "--fail-level", "WARNING")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout
    assert "WARNING" not in result.stderr and "security." not in result.stdout + result.stderr


def test_check_deploy_fails_with_a_short_secret_key(tmp_path):
    result = manage(production_env(tmp_path, SECRET_KEY="short"), "check", "--deploy", "--fail-level", "WARNING")

    assert result.returncode != 0
    assert "security.W009" in result.stderr


def test_only_behind_the_tls_proxy_is_plain_http_redirected_and_hsts_sent(tmp_path):
    names = ("SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "SESSION_COOKIE_SECURE", "DEBUG")
    behind = settings_of(production_env(tmp_path), *names)
    assert behind == {
        "SECURE_SSL_REDIRECT": True,
        "SECURE_HSTS_SECONDS": 365 * 24 * 3600,
        "SESSION_COOKIE_SECURE": True,
        "DEBUG": False,
    }
    make_run = production_env(tmp_path)
    del make_run["BEHIND_TLS_PROXY"], make_run["SECRET_KEY"]
    assert settings_of(make_run, *names) == {
        "SECURE_SSL_REDIRECT": False,
        "SECURE_HSTS_SECONDS": 0,
        "SESSION_COOKIE_SECURE": False,
        "DEBUG": False,
    }


def test_the_health_check_answers_plain_http_behind_the_proxy_and_pages_are_redirected(client, settings, db):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_REDIRECT_EXEMPT = [r"^api/v1/health$"]
    settings.SECURE_HSTS_SECONDS = 3600

    assert client.get("/login/").status_code == 301
    assert client.get("/api/v1/health").status_code == 200
    secure = client.get("/login/", HTTP_X_FORWARDED_PROTO="https")
    assert secure.status_code == 200
    assert secure["Strict-Transport-Security"].startswith("max-age=3600")
