"""Production topology: nginx in front of the portal sends the stored bytes (X-Accel-Redirect)."""

import getpass
import shutil
from pathlib import Path

import httpx
import pytest

from tests.dicomfiles import write_study
from tests.integration.stack import free_port, wait_for

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed (Debian package nginx)"),
]

# `user` keeps a root-started nginx's workers as the user that owns the 0640
# stored files (a deployment puts nginx in the portal's group instead); nginx
# started by another user ignores it.
CONF = """
user {user};
daemon off;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 100m;
    location / {{
      proxy_pass http://127.0.0.1:{upstream};
      proxy_set_header Host $http_host;
      proxy_request_buffering off;
    }}
    location /_dicom/ {{
      internal;
      alias {storage}/;
    }}
  }}
}}
"""


@pytest.fixture
def behind_nginx(postgres_stack, tmp_path):
    """A second portal process with X-Accel-Redirect on, behind its own nginx."""
    stack = postgres_stack
    upstream, port = free_port(), free_port()
    stack.start_server(port=upstream, env={**stack.env, "DICOM_ACCEL_REDIRECT": "/_dicom/"}, name="server-accel")
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        CONF.format(
            user=getpass.getuser(), tmp=tmp_path, port=port, upstream=upstream, storage=stack.env["DICOM_STORAGE_DIR"]
        )
    )
    nginx = stack.spawn("nginx", [NGINX, "-c", str(conf), "-p", str(tmp_path)])
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(url), what="nginx")
    yield url, f"http://127.0.0.1:{upstream}"
    nginx.stop()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_nginx_sends_the_stored_bytes_and_the_portal_audits_the_download(
    postgres_stack, pg_network, behind_nginx, tmp_path
):
    stack, (behind_nginx, portal) = postgres_stack, behind_nginx
    study = write_study(tmp_path / "outbox", series={"CT": 2})
    sent = stack.agent(pg_network.keys["own"], "send", str(tmp_path / "outbox"), server=behind_nginx)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    def received():
        result = stack.agent(
            pg_network.keys["partner"], "receive", "--inbox", str(inbox), "--once", server=behind_nginx
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return len(list(inbox.rglob("*.dcm"))) == 2

    wait_for(received, timeout=60, interval=0.5, what="two files through nginx")
    files = {p.name: p.read_bytes() for p in inbox.rglob("*.dcm")}
    assert files == {f"{uid}.dcm": path.read_bytes() for path, uid in study.items()}
    downloads = stack.sql(
        "SELECT count(*) FROM centers_auditevent e JOIN centers_center c ON c.id = e.center_id"
        " WHERE e.action = 'delivery.download' AND c.slug = %s",
        f"partner-{pg_network.s}",
    )
    assert downloads == [(2,)]
    # The portal itself answered with a redirect into nginx, not with the bytes.
    delivery = stack.sql(
        "SELECT d.id FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s LIMIT 1",
        f"partner-{pg_network.s}",
    )[0][0]
    headers = {"Authorization": f"Bearer {pg_network.keys['partner']}"}
    direct = httpx.get(f"{portal}/api/v1/deliveries/{delivery}/file", headers=headers)
    assert direct.status_code == 200
    assert direct.headers["X-Accel-Redirect"].startswith("/_dicom/instances/")
    assert direct.content == b""


def test_the_internal_location_is_not_reachable_from_outside(postgres_stack, pg_network, behind_nginx, tmp_path):
    write_study(tmp_path / "outbox", series={"MR": 1})
    sent = postgres_stack.agent(pg_network.keys["own"], "send", str(tmp_path / "outbox"), server=behind_nginx[0])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    storage = Path(postgres_stack.env["DICOM_STORAGE_DIR"])
    stored = next(storage.rglob("*.dcm"))
    assert httpx.get(f"{behind_nginx[0]}/_dicom/{stored.relative_to(storage)}").status_code == 404
