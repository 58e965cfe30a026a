"""The production layout in deploy/: the environment, the systemd units and the nginx site, run for real.

The units' command lines start the portal, the worker and beat; the shipped nginx site, with only its
addresses, paths and secret filled in as the README has an installer do, terminates TLS in front of them.
"""

import ast
import getpass
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from portal.env import env_size
from routing.api import MAX_WAIT
from routing.links import nginx_location
from tests.dicomfiles import dicom_bytes, write_study
from tests.integration.conftest import (
    TEST_BROKER_URL,
    TEST_DATABASE_URL,
    Network,
    _check_broker,
    _create_database,
    _delete_queue,
    _drop_database,
)
from tests.integration.stack import BIN, Stack, base_env, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ENV_EXAMPLE = DEPLOY / "exchange.env.example"
SITE = DEPLOY / "nginx" / "dicom-exchange.conf"
UNITS = DEPLOY / "systemd"
MANAGE = DEPLOY / "dicom-exchange-manage"
# Where the units expect the installation (README "Installing on a Debian server").
INSTALLED_VENV = "/opt/dicom-exchange/.venv"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
OPENSSL = shutil.which("openssl")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
ENV_READERS = {"env_str", "env_bool", "env_int", "env_float", "env_list", "env_size"}


def env_example() -> dict[str, str]:
    variables = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and name == name.strip() and re.fullmatch(r"[A-Z][A-Z0-9_]*", name), line
            assert name not in variables, f"{name} is set twice"
            variables[name] = value
    return variables


def settings_variables() -> set[str]:
    """Every variable portal/settings.py reads through portal.env."""
    tree = ast.parse((ROOT / "portal" / "settings.py").read_text())
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ENV_READERS
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }


def readme_production_variables() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Production", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1]))
    return names


def test_every_variable_of_the_environment_example_is_one_the_settings_read():
    unread = set(env_example()) - settings_variables()

    assert not unread, f"deploy/exchange.env.example sets variables portal/settings.py never reads: {unread}"


def test_every_variable_of_the_readme_production_table_is_in_the_environment_example():
    documented = readme_production_variables()
    assert len(documented) > 40

    missing = documented - set(env_example()) - unit_variables()
    assert not missing, f"missing from deploy/exchange.env.example: {sorted(missing)}"
    # prometheus-client reads PROMETHEUS_MULTIPROC_DIR itself, in the portal's processes only.
    assert not documented - settings_variables() - {"PROMETHEUS_MULTIPROC_DIR"}, "documented but read by no setting"


def test_every_variable_of_the_environment_example_is_explained_in_the_readme_production_tables():
    # The example's header sends the installer to the README for what each line means.
    unexplained = set(env_example()) - readme_production_variables()

    assert not unexplained, f"in deploy/exchange.env.example but in no README production table: {sorted(unexplained)}"


def unit_variables() -> set[str]:
    """Variables a unit sets for its own processes alone (Environment=NAME=value)."""
    names = set()
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        names |= set(re.findall(r"^Environment=([A-Z][A-Z0-9_]*)=", unit.read_text(), re.M))
    return names


def _example_env(tmp_path: Path, **extra: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "LANG")}
    env.update(env_example())
    # The installation's folders do not exist here; everything else is the file as shipped.
    (tmp_path / "upload-tmp").mkdir()
    env.update(
        {
            "PORTAL_VAR_DIR": str(tmp_path / "var"),
            "DICOM_STORAGE_DIR": str(tmp_path / "storage"),
            "FILE_UPLOAD_TEMP_DIR": str(tmp_path / "upload-tmp"),
            **extra,
        }
    )
    return env


def _manage(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_environment_example_passes_check_deploy_once_its_secret_key_is_set(tmp_path):
    env = _example_env(tmp_path, SECRET_KEY=secrets.token_urlsafe(50))

    result = _manage(env, "check", "--deploy", "--fail-level", "WARNING")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout


def test_the_environment_example_refuses_to_start_without_a_secret_key(tmp_path):
    result = _manage(_example_env(tmp_path), "check")

    assert result.returncode != 0
    assert "SECRET_KEY must be set in production" in result.stderr
    assert not (tmp_path / "var" / "secret_key").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="the wrapper switches user: root only")
def test_the_manage_wrapper_reads_the_environment_file_as_systemd_does(tmp_path):
    env_file = tmp_path / "exchange.env"
    env_file.write_text(
        ENV_EXAMPLE.read_text().replace("\nSECRET_KEY=\n", f"\nSECRET_KEY={secrets.token_urlsafe(50)}\n")
        + f"PORTAL_VAR_DIR={tmp_path / 'var'}\nDICOM_STORAGE_DIR={tmp_path / 'storage'}\n"
        + f"FILE_UPLOAD_TEMP_DIR={tmp_path}\n"
    )
    wrapper = tmp_path / "dicom-exchange-manage"
    wrapper.write_text(
        _substituted(
            MANAGE.read_text(),
            {
                "ENV_FILE=/etc/dicom-exchange/exchange.env": f"ENV_FILE={env_file}",
                "APP_DIR=/opt/dicom-exchange": f"APP_DIR={ROOT}",
                '"$APP_DIR/.venv/bin/python"': sys.executable,
                "-u exchange": f"-u {getpass.getuser()}",
            },
        )
    )
    clean_env = {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "LANG")}

    result = subprocess.run(
        ["sh", str(wrapper), "check", "--deploy", "--fail-level", "WARNING"],
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout


def _substituted(text: str, replacements: dict[str, str]) -> str:
    """The shipped text with what an installer fills in; each target must be there, or the file drifted."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the shipped file"
        text = text.replace(old, new)
    return text


@pytest.mark.skipif(not SYSTEMD_ANALYZE, reason="systemd-analyze is not installed (Debian package systemd)")
def test_systemd_analyze_verifies_the_units(tmp_path):
    units = sorted(UNITS.iterdir())
    assert {unit.name for unit in units} >= {
        "dicom-exchange-portal.service",
        "dicom-exchange-worker.service",
        "dicom-exchange-stat-worker.service",
        "dicom-exchange-beat.service",
        "dicom-exchange.target",
    }
    for unit in units:
        # The programs must exist for verify: the venv this test runs in stands for the installed one.
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_VENV, str(BIN.parent)))

    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *(str(tmp_path / unit.name) for unit in units)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    # verify exits 0 on some mistakes (an unknown value is "ignored"): any message is one.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def _normalized(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def test_the_nginx_site_agrees_with_the_environment_example_and_the_portal(monkeypatch):
    site, env = SITE.read_text(), env_example()
    locations = re.findall(r"^\s*location\s+(?:~\s+)?(\S+)\s*\{", site, re.MULTILINE)

    link_location = nginx_location(
        prefix=env["DICOM_DOWNLOAD_LINK_PREFIX"],
        storage_dir=env["DICOM_STORAGE_DIR"],
        secret="${DICOM_DOWNLOAD_LINK_SECRET}",
    )
    assert _normalized(link_location) in _normalized(site)
    assert env["DICOM_ACCEL_REDIRECT"] in locations
    assert f"alias {env['DICOM_STORAGE_DIR']}/;" in site
    assert "/static/" in locations and f"alias {env['PORTAL_VAR_DIR']}/static/;" in site
    [body_size] = re.findall(r"client_max_body_size\s+(\S+);", site)
    monkeypatch.setenv("SITE_BODY_SIZE", body_size)
    monkeypatch.setenv("EXAMPLE_UPLOAD_LIMIT", env["DICOM_MAX_UPLOAD_BYTES"])
    assert env_size("SITE_BODY_SIZE", 0) == env_size("EXAMPLE_UPLOAD_LIMIT", 0)
    [read_timeout] = re.findall(r"proxy_read_timeout\s+(\d+)s;", site)
    assert int(read_timeout) > MAX_WAIT
    assert "proxy_request_buffering off;" in site
    # HSTS comes from the portal alone (BEHIND_TLS_PROXY).
    assert not re.search(r"^\s*add_header\s+Strict-Transport-Security", site, re.MULTILINE | re.IGNORECASE)


# -- the installation, run: the units' commands behind the shipped nginx site, over TLS -------------------

# Debian's /etc/nginx/nginx.conf around the site, with its own (too permissive) TLS protocols, which the
# site overrides. `user` keeps a root-started nginx's workers as the user owning the 0640 stored files.
NGINX_CONF = """
user {user};
daemon off;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
  sendfile on;
  include /etc/nginx/mime.types;
  default_type application/octet-stream;
  ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  include {site};
}}
"""


def _openssl(*args: str) -> None:
    result = subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _certificates(folder: Path) -> dict[str, Path]:
    """A test CA, and a certificate it signed for localhost: the hospital's CA, in small."""
    folder.mkdir()
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=DICOM Exchange test CA",
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost",
    )  # fmt: skip
    extensions = folder / "server.ext"
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(extensions),
    )  # fmt: skip
    return {"ca": ca, "cert": cert, "key": key}


def _unit_command(unit: str, replacements: dict[str, str]) -> list[str]:
    """The ExecStart of a shipped unit, with the installation's paths and ports replaced."""
    [line] = [line for line in (UNITS / unit).read_text().splitlines() if line.startswith("ExecStart=")]
    return _substituted(line.removeprefix("ExecStart="), {INSTALLED_VENV: str(BIN.parent), **replacements}).split()


def _worker_unit_command(queue: str) -> list[str]:
    return _unit_command(
        "dicom-exchange-worker.service",
        # A node name of its own on the shared broker (see tests/integration/stack.py).
        {"-n worker@%H": f"-n {queue}@{socket.gethostname()}", "--concurrency 4": "--concurrency 2"},
    )


class Installation:
    def __init__(self, stack: Stack, *, url: str, plain_url: str, ca: Path, link_secret: str) -> None:
        self.stack, self.url, self.plain_url, self.link_secret = stack, url, plain_url, link_secret
        self.tls = ssl.create_default_context(cafile=str(ca))
        self.ca = ca

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, verify=self.tls, headers=headers, timeout=60)


def _portal_answers(port: int) -> bool:
    # ALLOWED_HOSTS names the portal's public host alone, which nginx passes on.
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/health", headers={"Host": "localhost"}, timeout=1)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200


@pytest.fixture(scope="module")
def installation(tmp_path_factory):
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (Debian package nginx)")
    if not OPENSSL:
        pytest.skip("openssl is not installed (Debian package openssl)")
    tmp = tmp_path_factory.mktemp("installation")
    _check_broker()
    database, queue = _create_database(), f"dx-deploy-{uuid.uuid4().hex[:8]}"
    portal_port, https_port, http_port = free_port(), free_port(), free_port()
    url = f"https://localhost:{https_port}"
    link_secret = secrets.token_hex(32)
    base, _, _ = TEST_DATABASE_URL.rpartition("/")
    env = {
        **base_env(tmp),
        **env_example(),
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "localhost",
        "CSRF_TRUSTED_ORIGINS": url,
        "PORTAL_PUBLIC_URL": url,
        "DATABASE_URL": f"{base}/{database}",
        "CELERY_BROKER_URL": TEST_BROKER_URL,
        "CELERY_QUEUE": queue,
        "CELERY_STAT_QUEUE": f"{queue}-stat",
        # Redis is no service of the test suite; every other setting is the example's.
        "CACHE_URL": "locmem://",
        "PORTAL_VAR_DIR": str(tmp / "var"),
        "DICOM_STORAGE_DIR": str(tmp / "storage"),
        "FILE_UPLOAD_TEMP_DIR": str(tmp / "upload-tmp"),
        "DICOM_DOWNLOAD_LINK_SECRET": link_secret,
    }
    for folder in ("var", "storage", "upload-tmp"):
        (tmp / folder).mkdir(mode=0o750)
    stack = Stack(tmp=tmp, env=env, with_worker=False)
    try:
        stack.manage("migrate", "--no-input", "-v0")
        stack.manage("collectstatic", "--no-input", "-v0")
        # The units' commands, on this machine's ports and paths, two processes each for a loaded test machine.
        stack.spawn(
            "portal",
            _unit_command(
                "dicom-exchange-portal.service", {"--port 8000": f"--port {portal_port}", "--workers 4": "--workers 2"}
            ),
        )
        stack.spawn("worker", _worker_unit_command(queue))
        stack.spawn(
            "stat-worker",
            _unit_command(
                "dicom-exchange-stat-worker.service",
                # systemd fills in the queue from the environment file; here the test's own queue.
                {"${CELERY_STAT_QUEUE}": f"{queue}-stat", "-n stat@%H": f"-n {queue}-stat@{socket.gethostname()}"},
            ),
        )
        stack.spawn(
            "beat",
            _unit_command(
                "dicom-exchange-beat.service",
                {"/var/lib/dicom-exchange/celerybeat-schedule": str(tmp / "var" / "celerybeat-schedule")},
            ),
        )
        wait_for(lambda: _portal_answers(portal_port), timeout=60, what="the portal unit's uvicorn")

        certificates = _certificates(tmp / "tls")
        site = tmp / "dicom-exchange.conf"
        site.write_text(
            _substituted(
                SITE.read_text(),
                {
                    "server 127.0.0.1:8000;": f"server 127.0.0.1:{portal_port};",
                    "listen 80;": f"listen 127.0.0.1:{http_port};",
                    "listen [::]:80;": "",
                    "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
                    "listen [::]:443 ssl http2;": "",
                    "server_name exchange.example.org;": "server_name localhost;",
                    "/etc/letsencrypt/live/exchange.example.org/fullchain.pem": str(certificates["cert"]),
                    "/etc/letsencrypt/live/exchange.example.org/privkey.pem": str(certificates["key"]),
                    "/var/log/nginx/": f"{tmp}/nginx-",
                    "/var/www/html": str(tmp / "acme"),
                    "/var/lib/dicom-exchange/": f"{tmp}/var/",
                    "/srv/dicom-exchange/storage/": f"{tmp}/storage/",
                    "${DICOM_DOWNLOAD_LINK_SECRET}": link_secret,
                },
            )
        )
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user=getpass.getuser(), tmp=tmp, site=site))
        tested = subprocess.run([NGINX, "-t", "-c", str(conf), "-p", str(tmp)], capture_output=True, text=True)
        assert tested.returncode == 0, tested.stderr
        stack.spawn("nginx", [NGINX, "-c", str(conf), "-p", str(tmp)])
        running = Installation(
            stack, url=url, plain_url=f"http://127.0.0.1:{http_port}", ca=certificates["ca"], link_secret=link_secret
        )

        def answers() -> bool:
            try:
                with running.client() as client:
                    return client.get("/api/v1/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, timeout=30, what="nginx over TLS")
        yield running
    finally:
        stack.stop()
        _drop_database(database)
        _delete_queue(queue)


@pytest.fixture
def centers(installation):
    return Network(installation.stack)


@pytest.mark.integration
def test_nginx_refuses_the_site_until_the_link_secret_is_filled_in(installation, tmp_path):
    site = tmp_path / "site.conf"
    site.write_text(
        (installation.stack.tmp / "dicom-exchange.conf")
        .read_text()
        .replace(installation.link_secret, "${DICOM_DOWNLOAD_LINK_SECRET}")
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=getpass.getuser(), tmp=tmp_path, site=site))

    tested = subprocess.run([NGINX, "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True)

    assert tested.returncode != 0
    assert 'unknown "dicom_download_link_secret" variable' in tested.stderr


@pytest.mark.integration
def test_the_health_check_answers_over_tls_with_hsts_sent_once_by_the_portal(installation):
    with installation.client() as client:
        health = client.get("/api/v1/health")
        page = client.get("/login/")

    assert health.status_code == 200
    assert page.status_code == 200
    assert page.headers.get_list("strict-transport-security") == ["max-age=31536000; includeSubDomains; preload"]
    assert page.extensions["http_version"] in (b"HTTP/1.1", b"HTTP/2")


@pytest.mark.integration
def test_plain_http_is_sent_to_https(installation):
    answer = httpx.get(f"{installation.plain_url}/login/?next=/", headers={"Host": "localhost"})

    assert answer.status_code == 301
    assert answer.headers["Location"] == "https://localhost/login/?next=/"


@pytest.mark.integration
def test_an_upload_through_nginx_is_delivered_by_signed_link_and_by_x_accel(installation, centers):
    body = dicom_bytes("CT")
    own, partner = installation.client(centers.keys["own"]), installation.client(centers.keys["partner"])
    with own, partner:
        # A client's own X-Forwarded-For must not become the address the portal records.
        upload = own.post(
            "/api/v1/instances",
            content=body,
            headers={"Content-Type": "application/dicom", "X-Forwarded-For": "203.0.113.9"},
        )
        assert upload.status_code in (200, 201), upload.text

        # The worker unit fans the instance out; the partner's long poll waits for it through nginx.
        def leased():
            answer = partner.get("/api/v1/deliveries", params={"wait": 10})
            assert answer.status_code == 200, answer.text
            return answer.json()

        [delivery] = wait_for(leased, timeout=90, interval=0, what="the delivery through nginx")

        link = delivery["download_url"]
        assert link.startswith(f"{installation.url}/dl/{delivery['id']}/instances/")
        signed = httpx.get(link, verify=installation.tls)
        assert signed.status_code == 200 and signed.content == body
        assert signed.headers["Content-Type"] == "application/dicom"
        forged = httpx.get(re.sub(r"md5=[^&]+", "md5=AAAAAAAAAAAAAAAAAAAAAA", link), verify=installation.tls)
        assert forged.status_code == 403

        accel = partner.get(f"/api/v1/deliveries/{delivery['id']}/file")
        assert accel.status_code == 200 and accel.content == body
        assert "X-Accel-Redirect" not in accel.headers
        stored = re.sub(r"^/dl/\d+/", "/_dicom/", urlsplit(link).path)
        internal = httpx.get(f"{installation.url}{stored}", verify=installation.tls)
        assert internal.status_code == 404

        ack = partner.post(f"/api/v1/deliveries/{delivery['id']}/ack", json={"sha256": delivery["sha256"]})
        assert ack.status_code == 200, ack.text

    addresses = installation.stack.sql(
        "SELECT DISTINCT host(e.address) FROM centers_auditevent e JOIN centers_center c ON c.id = e.center_id"
        " WHERE c.slug IN (%s, %s) AND e.address IS NOT NULL",
        f"own-{centers.s}",
        f"partner-{centers.s}",
    )
    assert addresses == [("127.0.0.1",)]


@pytest.mark.integration
def test_static_files_are_served_by_nginx_from_the_static_root(installation):
    # Written after the portal started: its whitenoise never saw the file, only nginx can send it.
    marker = installation.stack.tmp / "var" / "static" / f"marker-{uuid.uuid4().hex[:6]}.txt"
    marker.write_text("served by nginx")

    with installation.client() as client:
        answer = client.get(f"/static/{marker.name}")
        admin_css = client.get("/static/admin/css/base.css")

    assert answer.status_code == 200 and answer.text == "served by nginx"
    assert admin_css.status_code == 200 and "Cache-Control" in admin_css.headers


@pytest.mark.integration
def test_the_site_agents_relay_a_study_through_the_tls_site_trusting_the_hospital_ca(installation, centers, tmp_path):
    stack, ca = installation.stack, str(installation.ca)
    study = write_study(tmp_path / "outbox", series={"CT": 2, "MR": 1})
    sent = stack.agent(
        centers.keys["own"], "--ca-bundle", ca, "send", str(tmp_path / "outbox"), server=installation.url
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    def received() -> bool:
        result = stack.agent(
            centers.keys["partner"], "--ca-bundle", ca, "receive", "--inbox", str(inbox), "--once",
            server=installation.url,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return len(list(inbox.rglob("*.dcm"))) == len(study)

    wait_for(received, timeout=90, interval=0.5, what="the study in the partner's inbox")
    assert {p.name: p.read_bytes() for p in inbox.rglob("*.dcm")} == {
        f"{uid}.dcm": path.read_bytes() for path, uid in study.items()
    }
    # Without the CA the agent refuses the portal's certificate.
    untrusting = stack.agent(centers.keys["own"], "send", str(tmp_path / "outbox"), server=installation.url)
    assert untrusting.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in untrusting.stdout + untrusting.stderr


@pytest.mark.integration
def test_the_stat_worker_unit_routes_a_stat_upload_while_the_worker_unit_is_stopped(installation, centers):
    stack = installation.stack
    [worker] = [p for p in stack.processes if p.name == "worker"]
    worker.stop()
    stack.processes.remove(worker)
    try:
        with installation.client(centers.keys["own"]) as own:
            upload = own.post(
                "/api/v1/instances",
                params={"priority": "stat"},
                content=dicom_bytes("CT"),
                headers={"Content-Type": "application/dicom"},
            )
        assert upload.status_code == 201, upload.text
        sop = upload.json()["sop_instance_uid"]

        def routed() -> bool:
            return stack.sql("SELECT routed_at IS NOT NULL FROM routing_instance WHERE sop_instance_uid = %s", sop) == [
                (True,)
            ]

        wait_for(routed, timeout=90, what="the stat worker unit's fan-out")
    finally:
        stack.spawn("worker", _worker_unit_command(stack.env["CELERY_QUEUE"]))
