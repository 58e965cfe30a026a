"""The download fast path's checks (routing.fast_download): what it sends itself, and what it leaves to Django."""

import asyncio
import hashlib
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from bench.dataset import big_instance
from centers.models import ApiKey, AuditEvent
from centers.ratelimit import MemoryCounter, parse_rate
from portal.bridge import RATE_COUNTED
from routing.fast_download import CHUNK_BYTES, DeliveryFileFastPath, Download, DownloadAudit
from routing.loop_db import LoopDatabase
from routing.models import Delivery
from tests.dicomfiles import dicom_bytes

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="the fast path reads PostgreSQL"),
]


class Django:
    """Stands for the rest of the application: remembers what was handed on."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    async def __call__(self, scope, receive, send):
        self.seen.append(scope)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"django"})


def fetch(
    layer, delivery_id, key: str | None, *, host: bytes = b"testserver", extra: list | None = None
) -> tuple[int, dict, bytes]:
    headers = [(b"host", host), *(extra or [])]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": f"/api/v1/deliveries/{delivery_id}/file",
        "query_string": b"",
        "headers": headers,
        "client": ("192.0.2.7", 50000),
    }
    answer: dict = {"body": b""}

    async def receive():
        await asyncio.sleep(3600)

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            answer["body"] += message.get("body", b"")

    async def run():
        try:
            await layer(scope, receive, send)
        finally:
            await layer.db.close()

    asyncio.run(run())
    return answer["status"], answer["headers"], answer["body"]


@pytest.fixture
def django_app():
    return Django()


@pytest.fixture
def layer(django_app, settings, storage_dir):
    settings.STORAGE_BACKEND = "local"
    settings.DICOM_ACCEL_REDIRECT = ""
    return DeliveryFileFastPath(django_app, db=LoopDatabase(connection.settings_dict))


@pytest.fixture
def leased(agents):
    """A delivery leased by the partner, whose key was thereby just used."""
    data = dicom_bytes("CT")
    assert agents["own"].upload(data).status_code == 201
    item = agents["partner"].lease(limit=1).json()[0]
    return item, data


def downloads_audited(delivery_id: int) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action="delivery.download", object_id=str(delivery_id)))


def test_it_sends_a_leased_file_itself_and_audits_it_like_django(layer, django_app, leased, keys, network):
    item, data = leased
    status, headers, body = fetch(layer, item["id"], keys["partner"])
    assert (status, body) == (200, data)
    assert django_app.seen == []
    assert headers["content-length"] == str(len(data))
    assert headers["content-type"] == "application/dicom"
    assert headers["content-disposition"] == f'attachment; filename="{item["sop_instance_uid"]}.dcm"'
    assert headers["x-checksum-sha256"] == hashlib.sha256(data).hexdigest()
    [event] = downloads_audited(item["id"])
    key = ApiKey.objects.get(center=network["partner"])
    assert (event.center_id, event.api_key_id, event.object_type, event.address, event.user_id) == (
        network["partner"].pk,
        key.pk,
        "delivery",
        "192.0.2.7",
        None,
    )
    assert event.detail == {"sop_instance_uid": item["sop_instance_uid"]}


def test_a_file_larger_than_one_read_arrives_whole(layer, agents, keys, tmp_path):
    data = big_instance(tmp_path, seed=5, megabytes=3).read_bytes()
    assert len(data) > 2 * CHUNK_BYTES
    assert agents["own"].upload(data).status_code == 201
    item = agents["partner"].lease(limit=1).json()[0]
    status, headers, body = fetch(layer, item["id"], keys["partner"])
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == item["sha256"] == headers["x-checksum-sha256"]


def test_another_centers_delivery_goes_to_django(layer, django_app, leased, keys, agents):
    item, _ = leased
    agents["outsider"].lease()  # the outsider's key is recently used too
    assert fetch(layer, item["id"], keys["outsider"])[0] == 299
    assert len(django_app.seen) == 1
    assert downloads_audited(item["id"]) == []


@pytest.mark.parametrize("key", [None, "dx_unknown", "not a bearer"])
def test_no_key_or_an_unknown_one_goes_to_django(layer, django_app, leased, key):
    item, _ = leased
    assert fetch(layer, item["id"], key)[0] == 299
    assert downloads_audited(item["id"]) == []


def test_a_revoked_key_or_an_inactive_center_goes_to_django(layer, leased, keys, network):
    item, _ = leased
    ApiKey.objects.filter(center=network["partner"]).update(revoked_at=timezone.now())
    assert fetch(layer, item["id"], keys["partner"])[0] == 299
    ApiKey.objects.filter(center=network["partner"]).update(revoked_at=None)
    network["partner"].is_active = False
    network["partner"].save()
    assert fetch(layer, item["id"], keys["partner"])[0] == 299
    assert downloads_audited(item["id"]) == []


def test_a_missing_stored_file_goes_to_django_which_fails_the_delivery(layer, leased, keys, storage_dir):
    item, _ = leased
    stored = Delivery.objects.select_related("instance").get(pk=item["id"]).instance.file
    (storage_dir / stored).unlink()
    assert fetch(layer, item["id"], keys["partner"])[0] == 299
    assert downloads_audited(item["id"]) == []


def test_a_stored_file_of_another_size_goes_to_django(layer, leased, keys, storage_dir):
    item, _ = leased
    stored = Delivery.objects.select_related("instance").get(pk=item["id"]).instance.file
    with (storage_dir / stored).open("ab") as file:
        file.write(b"\0")
    assert fetch(layer, item["id"], keys["partner"])[0] == 299


def test_a_delivery_no_longer_leased_goes_to_django(layer, leased, keys, agents):
    item, _ = leased
    assert agents["partner"].ack(item["id"], item["sha256"]).status_code == 200
    assert fetch(layer, item["id"], keys["partner"])[0] == 299


def test_a_key_whose_use_is_due_to_be_recorded_goes_to_django(layer, leased, keys, network):
    item, _ = leased
    ApiKey.objects.filter(center=network["partner"]).update(last_used_at=timezone.now() - timedelta(minutes=2))
    assert fetch(layer, item["id"], keys["partner"])[0] == 299


def test_a_plain_http_request_django_would_redirect_goes_to_django(layer, leased, keys, settings):
    item, _ = leased
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_HSTS_SECONDS = 60
    assert fetch(layer, item["id"], keys["partner"])[0] == 299
    status, headers, _ = fetch(layer, item["id"], keys["partner"], extra=[(b"x-forwarded-proto", b"https")])
    assert status == 200
    assert headers["strict-transport-security"].startswith("max-age=60")


def test_a_host_django_refuses_goes_to_django(layer, leased, keys):
    item, _ = leased
    assert fetch(layer, item["id"], keys["partner"], host=b"evil.example")[0] == 299
    assert downloads_audited(item["id"]) == []


def test_a_cross_origin_request_goes_to_django(layer, leased, keys):
    item, _ = leased
    assert fetch(layer, item["id"], keys["partner"], extra=[(b"origin", b"https://viewer.example")])[0] == 299


def test_a_key_past_its_rate_is_refused_once_and_counted_once(django_app, leased, keys, settings, storage_dir):
    item, _ = leased
    layer = DeliveryFileFastPath(
        django_app, db=LoopDatabase(connection.settings_dict), counter=MemoryCounter(), rate=parse_rate("2/m")
    )
    assert fetch(layer, item["id"], keys["partner"])[0] == 200
    assert fetch(layer, item["id"], keys["partner"])[0] == 200
    assert fetch(layer, item["id"], keys["partner"])[0] == 429
    # Handed on to Django, a request carries its count: the bridge does not count it again.
    assert fetch(layer, 10**9, keys["own"])[0] == 299
    assert django_app.seen[-1][RATE_COUNTED] is True


def test_downloads_at_once_share_one_insert(leased, network):
    item, _ = leased
    db = LoopDatabase(connection.settings_dict)
    audit = DownloadAudit(db)
    inserts = []
    original = audit._insert

    async def counted(batch):
        inserts.append(len(batch))
        await original(batch)

    audit._insert = counted
    key = ApiKey.objects.get(center=network["partner"])
    download = Download(item["id"], key.pk, network["partner"].pk, "x", 1, "0" * 64, item["sop_instance_uid"])

    async def run():
        try:
            await asyncio.gather(*(audit.record(download, "192.0.2.7") for _ in range(10)))
        finally:
            await db.close()

    asyncio.run(run())
    assert inserts == [10]
    assert len(downloads_audited(item["id"])) == 10
