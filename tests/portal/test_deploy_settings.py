"""Production settings: `manage.py check --deploy` is clean with the environment the README documents,
and `make run`'s plain HTTP on 127.0.0.1 keeps working without it."""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def production_env(tmp_path: Path, **extra: str) -> dict:
    """README.md "Production": the variables it sets, nothing inherited that could change the outcome."""
    env = {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "LANG", "SYSTEMROOT")}
    env.update(
        {
            "PORTAL_VAR_DIR": str(tmp_path / "var"),
            "DATABASE_URL": "postgresql://exchange@127.0.0.1:5432/exchange",
            "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
            "CACHE_URL": "redis://127.0.0.1:6379/0",
            "SECRET_KEY": secrets.token_urlsafe(50),
            "ALLOWED_HOSTS": "exchange.example.org",
            "CSRF_TRUSTED_ORIGINS": "https://exchange.example.org",
            "BEHIND_TLS_PROXY": "1",
            **extra,
        }
    )
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
