"""Production topology: nginx in front of the portal sends the stored bytes (X-Accel-Redirect)."""

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from routing.links import nginx_location, signed_download_path
from tests.dicomfiles import write_study
from tests.integration.nginx import NGINX, nginx_start
from tests.integration.stack import free_port, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed (Debian package nginx)"),
]

LINK_SECRET = "test-link-secret-0123456789"


def _nginx_in_front(stack, tmp_path, *, env: dict, links: str = ""):
    upstream = free_port()
    stack.start_server(port=upstream, env={**stack.env, **env}, name=f"server-{upstream}")
    nginx, url = nginx_start(stack, tmp_path, upstreams=[upstream], links=links)
    return nginx, url, f"http://127.0.0.1:{upstream}"


@pytest.fixture
def behind_nginx(postgres_stack, tmp_path):
    """A second portal process with X-Accel-Redirect on, behind its own nginx."""
    nginx, url, upstream = _nginx_in_front(postgres_stack, tmp_path, env={"DICOM_ACCEL_REDIRECT": "/_dicom/"})
    yield url, upstream
    nginx.stop()


@pytest.fixture
def with_signed_links(postgres_stack, tmp_path):
    """A portal process handing out signed links, behind an nginx that checks them (secure_link)."""
    links = nginx_location(prefix="/dl/", storage_dir=postgres_stack.env["DICOM_STORAGE_DIR"], secret=LINK_SECRET)
    nginx, url, upstream = _nginx_in_front(
        postgres_stack,
        tmp_path,
        env={"DICOM_ACCEL_REDIRECT": "/_dicom/", "DICOM_DOWNLOAD_LINK_SECRET": LINK_SECRET},
        links=links,
    )
    yield url
    nginx.stop()


def _relay_ct_study(stack, network, tmp_path, *, url: str, instances: int) -> None:
    """The own center sends a CT study through `url`; the partner's agent receives it byte for byte."""
    study = write_study(tmp_path / "outbox", series={"CT": instances})
    sent = stack.agent(network.keys["own"], "send", str(tmp_path / "outbox"), server=url)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    def received():
        result = stack.agent(network.keys["partner"], "receive", "--inbox", str(inbox), "--once", server=url)
        assert result.returncode == 0, result.stdout + result.stderr
        return len(list(inbox.rglob("*.dcm"))) == instances

    wait_for(received, interval=0.5, what=f"{instances} files through nginx")
    files = {p.name: p.read_bytes() for p in inbox.rglob("*.dcm")}
    assert files == {f"{uid}.dcm": path.read_bytes() for path, uid in study.items()}


def test_nginx_sends_the_stored_bytes_and_the_portal_audits_the_download(
    postgres_stack, pg_network, behind_nginx, tmp_path
):
    stack, (behind_nginx, portal) = postgres_stack, behind_nginx
    _relay_ct_study(stack, pg_network, tmp_path, url=behind_nginx, instances=2)
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
    direct = httpx.get(f"{portal}/api/v1/deliveries/{delivery}/file", headers=headers, timeout=30)
    assert direct.status_code == 200
    assert direct.headers["X-Accel-Redirect"].startswith("/_dicom/instances/")
    assert direct.content == b""


def test_the_internal_location_is_not_reachable_from_outside(postgres_stack, pg_network, behind_nginx, tmp_path):
    write_study(tmp_path / "outbox", series={"MR": 1})
    sent = postgres_stack.agent(pg_network.keys["own"], "send", str(tmp_path / "outbox"), server=behind_nginx[0])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    storage = Path(postgres_stack.env["DICOM_STORAGE_DIR"])
    stored = next(storage.rglob("*.dcm"))
    assert httpx.get(f"{behind_nginx[0]}/_dicom/{stored.relative_to(storage)}", timeout=30).status_code == 404


def test_with_signed_links_nginx_serves_the_bytes_without_asking_the_portal(
    postgres_stack, pg_network, with_signed_links, tmp_path
):
    stack, url = postgres_stack, with_signed_links
    _relay_ct_study(stack, pg_network, tmp_path, url=url, instances=3)
    actions = stack.sql(
        "SELECT e.action, count(*) FROM centers_auditevent e JOIN centers_center c ON c.id = e.center_id"
        " WHERE c.slug = %s GROUP BY e.action ORDER BY e.action",
        f"partner-{pg_network.s}",
    )
    # The lease is the audited grant; no download reached the portal.
    assert dict(actions)["delivery.ack"] == 3
    assert dict(actions)["delivery.lease"] >= 1
    assert "delivery.download" not in dict(actions)


def test_a_signed_link_works_only_as_signed_and_until_the_lease_ends(
    postgres_stack, pg_network, with_signed_links, tmp_path
):
    stack, url = postgres_stack, with_signed_links
    write_study(tmp_path / "outbox", series={"MR": 1})
    sent = stack.agent(pg_network.keys["own"], "send", str(tmp_path / "outbox"), server=url)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    headers = {"Authorization": f"Bearer {pg_network.keys['partner']}"}
    item = wait_for(
        lambda: httpx.get(f"{url}/api/v1/deliveries", params={"limit": 1}, headers=headers, timeout=30).json(),
        what="a delivery to lease",
    )[0]
    link = item["download_url"]
    assert link.startswith(f"{url}/dl/{item['id']}/instances/")
    # The signed link is the credential: no key is needed, and nginx sends the bytes.
    fetched = httpx.get(link, timeout=30)
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "application/dicom"
    assert hashlib.sha256(fetched.content).hexdigest() == item["sha256"]

    path = link.removeprefix(url).split("?")[0]
    tampered = link.replace("md5=", "md5=A")
    other_delivery = link.replace(f"/dl/{item['id']}/", f"/dl/{item['id'] + 1}/")
    assert httpx.get(tampered, timeout=30).status_code == 403
    assert httpx.get(other_delivery, timeout=30).status_code == 403
    assert httpx.get(f"{url}{path}", timeout=30).status_code == 403
    expired = signed_download_path(
        prefix="/dl/",
        delivery_id=item["id"],
        file_name=path.split("/", 3)[3],
        expires=datetime.now(UTC) - timedelta(seconds=5),
        secret=LINK_SECRET,
    )
    assert httpx.get(f"{url}{expired}", timeout=30).status_code == 410
