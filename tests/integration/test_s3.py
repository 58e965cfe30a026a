"""The portal with its files in an S3 bucket, served by a real S3 server process (moto_server).

test_exchange.py runs whole on this set-up too (the `stack` fixture's "s3" param); here
is what is particular to S3: the bytes are in the bucket once an upload is answered,
leases hand out presigned URLs of the bucket that end with the lease and that the agent
fetches without its key, DICOMweb, the ZIP download and rendering read the bucket, and
the orphan sweep lists and deletes there.
"""

import hashlib
import io
import json
import uuid
import zipfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.dicomfiles import dicom_bytes, write_study
from tests.integration.stack import wait_for
from tests.integration.test_privacy import PASSWORD, login

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("stack", ["s3"], indirect=True)]


def _key(name: str) -> str:
    """The object key of a stored file: S3_PREFIX (default "dicom") and the name."""
    return f"dicom/{name}"


def _stored(stack, s3_server, name: str) -> dict | None:
    try:
        return s3_server.client().head_object(Bucket=stack.env["S3_BUCKET"], Key=_key(name))
    except ClientError as exc:
        if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
            return None
        raise


def _send(stack, network, folder) -> None:
    sent = stack.agent(network.keys["own"], "send", str(folder))
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _deliveries_of(stack, role: str, network) -> list[tuple]:
    return stack.sql(
        "SELECT d.id, i.file, i.size, i.sha256 FROM routing_delivery d JOIN routing_instance i ON i.id = d.instance_id "
        "JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s ORDER BY d.id",
        f"{role}-{network.s}",
    )


def _lease(stack, key: str) -> list[dict]:
    answer = httpx.get(
        f"{stack.url}/api/v1/deliveries", params={"limit": 100}, headers={"Authorization": f"Bearer {key}"}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_an_answered_upload_is_in_the_bucket_and_nothing_is_on_the_portals_disk(stack, network, tmp_path, s3_server):
    write_study(tmp_path / "outbox", series={"CT": 2})
    _send(stack, network, tmp_path / "outbox")
    rows = stack.sql(
        "SELECT i.file, i.size FROM routing_instance i JOIN centers_center c ON c.id = i.source_center_id "
        "WHERE c.slug = %s",
        f"own-{network.s}",
    )
    assert len(rows) == 2
    for name, size in rows:
        head = _stored(stack, s3_server, name)
        assert head is not None, name
        assert head["ContentLength"] == size
    assert not list(Path(stack.env["DICOM_STORAGE_DIR"]).rglob("*.dcm"))


def test_a_lease_hands_out_presigned_bucket_urls_that_end_with_the_lease(stack, network, tmp_path, s3_server):
    write_study(tmp_path / "outbox", series={"CT": 2})
    _send(stack, network, tmp_path / "outbox")
    wait_for(lambda: len(_deliveries_of(stack, "partner", network)) == 2, what="the fan-out to the partner")
    leased = _lease(stack, network.keys["partner"])
    assert len(leased) == 2
    files = {row[0]: row for row in _deliveries_of(stack, "partner", network)}
    for item in leased:
        url = urlsplit(item["download_url"])
        assert f"{url.scheme}://{url.netloc}" == s3_server.url
        assert url.path == f"/{stack.env['S3_BUCKET']}/{_key(files[item['id']][1])}"
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and query["X-Amz-Signature"]
        # Signed until the lease ends, to the second.
        signed = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        [(lease_end,)] = stack.sql("SELECT lease_expires_at FROM routing_delivery WHERE id = %s", item["id"])
        until = signed + timedelta(seconds=int(query["X-Amz-Expires"]))
        assert abs((until - lease_end).total_seconds()) <= 2, (until, lease_end)

        # The URL alone, no key: the bucket answers with the stored bytes.
        fetched = httpx.get(item["download_url"])
        assert fetched.status_code == 200, fetched.text
        assert fetched.headers["Content-Type"] == "application/dicom"
        assert hashlib.sha256(fetched.content).hexdigest() == item["sha256"]

    # The lease is the audited grant: it names every delivery it handed out.
    grants = stack.sql(
        "SELECT object_id FROM centers_auditevent WHERE action = 'delivery.lease' AND center_id = "
        "(SELECT id FROM centers_center WHERE slug = %s)",
        f"partner-{network.s}",
    )
    granted = {int(i) for (ids,) in grants for i in ids.split(",")}
    assert {item["id"] for item in leased} <= granted


def test_the_agent_fetches_from_the_bucket_and_never_sends_it_its_key(stack, network, tmp_path, s3_server):
    write_study(tmp_path / "outbox", series={"CT": 3})
    _send(stack, network, tmp_path / "outbox")
    wait_for(lambda: len(_deliveries_of(stack, "partner", network)) == 3, what="the fan-out to the partner")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    s3_server.recording.unlink(missing_ok=True)
    assert httpx.post(f"{s3_server.url}/moto-api/recorder/start-recording").status_code == 200
    try:
        received = stack.agent(network.keys["partner"], "receive", "--inbox", str(inbox), "--once")
    finally:
        httpx.post(f"{s3_server.url}/moto-api/recorder/stop-recording")
    assert received.returncode == 0, received.stdout + received.stderr
    assert len(list(inbox.rglob("*.dcm"))) == 3

    requests = [json.loads(line) for line in s3_server.recording.read_text().splitlines()]
    stored = {f"/{stack.env['S3_BUCKET']}/{_key(row[1])}" for row in _deliveries_of(stack, "partner", network)}
    fetched = [r for r in requests if r["method"] == "GET" and urlsplit(r["url"]).path in stored]
    assert {urlsplit(r["url"]).path for r in fetched} == stored
    for request in fetched:
        headers = {name.lower(): value for name, value in request["headers"].items()}
        assert "authorization" not in headers, headers
        assert network.keys["partner"] not in json.dumps(request)
    # Nothing went through the portal: no download of these deliveries was served there.
    ids = [str(row[0]) for row in _deliveries_of(stack, "partner", network)]
    assert stack.sql(
        "SELECT count(*) FROM centers_auditevent WHERE action = 'delivery.download' AND object_id = ANY(%s)", ids
    ) == [(0,)]
    assert stack.sql(
        "SELECT count(*) FROM routing_delivery WHERE id = ANY(%s) AND status = 'delivered'",
        [int(i) for i in ids],
    ) == [(3,)]


def test_the_portals_own_download_reads_the_bucket_and_a_lost_object_fails_its_delivery(
    stack, network, tmp_path, s3_server
):
    write_study(tmp_path / "outbox", series={"CT": 2})
    _send(stack, network, tmp_path / "outbox")
    wait_for(lambda: len(_deliveries_of(stack, "partner", network)) == 2, what="the fan-out to the partner")
    (kept, kept_file, _, kept_sha), (lost, lost_file, _, _) = _deliveries_of(stack, "partner", network)
    _lease(stack, network.keys["partner"])
    key = {"Authorization": f"Bearer {network.keys['partner']}"}

    answer = httpx.get(f"{stack.url}/api/v1/deliveries/{kept}/file", headers=key)
    assert answer.status_code == 200
    assert hashlib.sha256(answer.content).hexdigest() == kept_sha == answer.headers["X-Checksum-SHA256"]

    s3_server.client().delete_object(Bucket=stack.env["S3_BUCKET"], Key=_key(lost_file))
    gone = httpx.get(f"{stack.url}/api/v1/deliveries/{lost}/file", headers=key)
    assert gone.status_code == 410, gone.text
    assert stack.sql("SELECT status FROM routing_delivery WHERE id = %s", lost) == [("failed",)]


def test_dicomweb_the_zip_download_and_rendering_read_from_the_bucket(stack, network, tmp_path):
    study_uid, series_uid = f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}"
    sent = {}
    for number in (1, 2):
        sop_uid = f"2.25.{uuid.uuid4().int}"
        sent[sop_uid] = dicom_bytes(
            "CT", study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, instance_number=number
        )
        (tmp_path / "outbox").mkdir(exist_ok=True)
        (tmp_path / "outbox" / f"{number}.dcm").write_bytes(sent[sop_uid])
    _send(stack, network, tmp_path / "outbox")
    wait_for(lambda: len(_deliveries_of(stack, "partner", network)) == 2, what="the fan-out to the partner")
    sop_uid = next(iter(sent))

    dicomweb = httpx.Client(
        base_url=f"{stack.url}/dicomweb", headers={"Authorization": f"Bearer {network.keys['partner']}"}, timeout=30
    )
    instance = f"/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
    retrieved = dicomweb.get(instance, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert retrieved.status_code == 200, retrieved.text
    assert sent[sop_uid] in retrieved.content
    whole = dicomweb.get(f"/studies/{study_uid}", headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert whole.status_code == 200 and all(body in whole.content for body in sent.values())
    metadata = dicomweb.get(f"{instance}/metadata")
    assert metadata.status_code == 200 and sop_uid in metadata.text
    rendered = dicomweb.get(f"{instance}/rendered", headers={"Accept": "image/png"})
    assert rendered.status_code == 200, rendered.text
    assert rendered.content.startswith(b"\x89PNG\r\n\x1a\n")

    username = f"dr-s3-{network.s}"
    stack.manage("create_clinician", username, f"partner-{network.s}", "--password", PASSWORD)
    browser = login(stack, username)
    archive = browser.get(f"/studies/{study_uid}/download.zip")
    assert archive.status_code == 200
    with zipfile.ZipFile(io.BytesIO(archive.content)) as opened:
        assert sorted(opened.read(name) for name in opened.namelist()) == sorted(sent.values())
    frame = browser.get(f"/instances/{sop_uid}/frames/0")
    assert frame.status_code == 200 and frame.content.startswith(b"\x89PNG\r\n\x1a\n")


SWEEP = (
    "from datetime import timedelta; from routing.upkeep import storage_sweep_orphans; "
    "print(storage_sweep_orphans(grace=timedelta(seconds={grace}), lookback_days=1, batch=100))"
)


def test_the_orphan_sweep_deletes_an_old_object_no_instance_names_and_nothing_else(stack, network, tmp_path, s3_server):
    (tmp_path / "ct.dcm").write_bytes(dicom_bytes("CT"))
    _send(stack, network, tmp_path / "ct.dcm")
    [(kept,)] = stack.sql(
        "SELECT i.file FROM routing_instance i JOIN centers_center c ON c.id = i.source_center_id WHERE c.slug = %s",
        f"own-{network.s}",
    )
    # What a process killed between the write and the commit leaves behind.
    orphan = f"instances/{datetime.now(UTC):%Y/%m/%d}/{uuid.uuid4().hex}.dcm"
    s3_server.client().put_object(Bucket=stack.env["S3_BUCKET"], Key=_key(orphan), Body=b"DICM orphan")

    def sweep(grace: int) -> str:
        return stack.manage("shell", "--no-imports", "-c", SWEEP.format(grace=grace)).stdout.strip()

    # Younger than the grace: an upload in flight looks the same, so it stays.
    assert sweep(3600) == "[]"
    assert _stored(stack, s3_server, orphan) is not None
    # Once older than the grace, it goes, and only it.
    wait_for(lambda: sweep(1) == repr([orphan]), timeout=30, interval=1, what="the sweep to remove the orphan")
    assert _stored(stack, s3_server, orphan) is None
    assert _stored(stack, s3_server, kept) is not None
    assert stack.sql(
        "SELECT count(*) FROM centers_auditevent WHERE action = 'storage.orphan_delete' AND object_id = %s", orphan
    ) == [(1,)]


def test_a_study_fans_out_through_the_bucket_and_each_center_loses_and_duplicates_nothing(
    stack, network, tmp_path, s3_server
):
    study = write_study(tmp_path / "outbox", series={"CT": 20, "MR": 10})
    sent = {path.read_bytes(): uid for path, uid in study.items()}
    digests = {uid: hashlib.sha256(data).hexdigest() for data, uid in sent.items()}
    mr = {uid for path, uid in study.items() if path.name.startswith("MR-")}
    expected = {"partner": set(study.values()), "mr": mr, "outsider": set()}
    _send(stack, network, tmp_path / "outbox")
    wait_for(
        lambda: (
            len(_deliveries_of(stack, "partner", network)) == 30 and len(_deliveries_of(stack, "mr", network)) == 10
        ),
        what="the fan-out to the partner and the MR center",
    )

    for role, uids in expected.items():
        inbox = tmp_path / f"inbox-{role}"
        inbox.mkdir()
        received = stack.agent(network.keys[role], "receive", "--inbox", str(inbox), "--once")
        assert received.returncode == 0, received.stdout + received.stderr
        # Everything but the agent's own dot-files (its lock) is a received file.
        files = [p for p in inbox.rglob("*") if p.is_file() and not p.name.startswith(".")]
        got = Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in files)
        want = Counter(digests[uid] for uid in uids)
        lost, duplicated = sum((want - got).values()), sum((got - want).values())
        rows = stack.sql(
            "SELECT count(*), count(DISTINCT d.instance_id) FROM routing_delivery d"
            " JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s AND d.status = 'delivered'",
            f"{role}-{network.s}",
        )
        print(f"{role}-{network.s} on S3: {len(uids)} expected, lost={lost} duplicated={duplicated}")
        assert (lost, duplicated) == (0, 0)
        assert rows == [(len(uids), len(uids))]
    # Stored once in the bucket: one object per instance, whoever receives it.
    assert all(_stored(stack, s3_server, row[1]) for row in _deliveries_of(stack, "partner", network))
