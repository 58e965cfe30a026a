"""The whole exchange on the real stack: agents publish, the portal routes, agents receive."""

import hashlib
import threading

import httpx
import pytest

from tests.dicomfiles import dicom_bytes, write_study
from tests.integration.stack import wait_for

pytestmark = pytest.mark.integration


def inbox_files(inbox):
    return {p.name: p.read_bytes() for p in inbox.rglob("*.dcm")} if inbox.exists() else {}


def receive_all(stack, key, inbox, expected: int) -> dict:
    """Drain the queue until `expected` files are in; with a worker, fan-out may lag the upload."""
    inbox.mkdir(exist_ok=True)

    def drained():
        result = stack.agent(key, "receive", "--inbox", str(inbox), "--once")
        assert result.returncode == 0, result.stdout + result.stderr
        return len(inbox_files(inbox)) >= expected

    wait_for(drained, interval=0.5, what=f"{expected} files in {inbox.name}")
    return inbox_files(inbox)


def routed_count(stack, network) -> int:
    return stack.sql(
        "SELECT count(*) FROM routing_instance i JOIN centers_center c ON c.id = i.source_center_id "
        "WHERE c.slug = %s AND i.routed_at IS NOT NULL",
        f"own-{network.s}",
    )[0][0]


def test_a_study_reaches_exactly_the_subscribed_centers_byte_for_byte(stack, network, tmp_path):
    study = write_study(tmp_path / "outbox", series={"CT": 3, "MR": 2, "NM": 2})
    sent = stack.agent(network.keys["own"], "send", "--parallel", "4", str(tmp_path / "outbox"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "7 sent" in sent.stdout + sent.stderr

    expected = {
        "partner": {p for p in study},
        "mr": {p for p in study if p.name.startswith("MR-")},
        "outsider": set(),
    }
    wait_for(lambda: routed_count(stack, network) == 7, what="the fan-out of 7 instances")
    for role, paths in expected.items():
        inbox = tmp_path / f"inbox-{role}"
        files = receive_all(stack, network.keys[role], inbox, len(paths))
        assert set(files) == {f"{study[p]}.dcm" for p in paths}, role
        for path in paths:
            assert files[f"{study[path]}.dcm"] == path.read_bytes()

    # The receiver's layout: <patient id>/<study uid>/<series uid>/<sop uid>.dcm
    some = next(iter((tmp_path / "inbox-partner").rglob("*.dcm")))
    assert some.relative_to(tmp_path / "inbox-partner").parts[0] == "PAT-001"
    # Everything was acknowledged: nothing left queued or in flight (in this test's network;
    # other tests on the same stack may leave theirs queued).
    pending = stack.sql(
        "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id "
        "WHERE d.status != 'delivered' AND c.slug LIKE %s",
        f"%-{network.s}",
    )
    assert pending == [(0,)]
    # Downloads were streamed, not read whole into memory by Django's ASGI handler.
    assert "must consume synchronous iterators" not in stack.logs()


def test_sending_again_is_idempotent(stack, network, tmp_path):
    write_study(tmp_path / "outbox", series={"CT": 2})
    assert stack.agent(network.keys["own"], "send", str(tmp_path / "outbox")).returncode == 0
    again = stack.agent(network.keys["own"], "send", str(tmp_path / "outbox"))
    assert again.returncode == 0
    assert "2 already present" in again.stdout + again.stderr
    assert len(receive_all(stack, network.keys["partner"], tmp_path / "in", 2)) == 2
    assert stack.agent(network.keys["partner"], "receive", "--inbox", str(tmp_path / "in"), "--once").returncode == 0


def test_parallel_uploads_all_land(stack, network, tmp_path):
    """Many uploads at once, from several agents: nothing lost, no 'database is locked'."""
    for n in range(3):
        write_study(tmp_path / f"outbox-{n}", series={"CT": 8}, patient_id=f"PAT-{n}")
    results = []

    def send(n):
        results.append(stack.agent(network.keys["own"], "send", "--parallel", "6", str(tmp_path / f"outbox-{n}")))

    threads = [threading.Thread(target=send, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.returncode == 0 for r in results), [r.stdout + r.stderr for r in results]
    assert len(receive_all(stack, network.keys["partner"], tmp_path / "in", 24)) == 24


def test_concurrent_receivers_of_one_center_never_share_a_delivery(stack, network, tmp_path):
    write_study(tmp_path / "outbox", series={"CT": 12})
    assert stack.agent(network.keys["own"], "send", str(tmp_path / "outbox")).returncode == 0
    wait_for(
        lambda: (
            stack.sql(
                "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s",
                f"partner-{network.s}",
            )[0][0]
            == 12
        ),
        what="12 deliveries queued",
    )
    results = {}

    def receive(n):
        (tmp_path / f"in-{n}").mkdir()
        results[n] = stack.agent(
            network.keys["partner"], "receive", "--inbox", str(tmp_path / f"in-{n}"), "--once", "--limit", "2"
        )

    threads = [threading.Thread(target=receive, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.returncode == 0 for r in results.values())
    per_receiver = [set(inbox_files(tmp_path / f"in-{n}")) for n in range(3)]
    assert sum(len(s) for s in per_receiver) == 12
    assert set().union(*per_receiver) == {f"{uid}.dcm" for uid in _uids(tmp_path / "outbox")}
    leases = stack.sql(
        "SELECT d.attempts FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s",
        f"partner-{network.s}",
    )
    assert {attempts for (attempts,) in leases} == {1}


def _uids(folder):
    import pydicom

    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in folder.rglob("*.dcm")}


def test_the_send_command_skips_non_dicom_and_names_each_failure(stack, network, tmp_path):
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "notes.txt").write_text("not an image")
    good = dicom_bytes("CT")
    (outbox / "good.dcm").write_bytes(good)
    (outbox / "truncated.dcm").write_bytes(dicom_bytes("CT")[:-2000])
    result = stack.agent(network.keys["own"], "send", str(outbox))
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "truncated.dcm" in output and "truncated" in output
    assert "notes.txt" in output
    assert "1 sent" in output


def test_a_slow_uploader_does_not_starve_the_portal(stack, network):
    """Clients trickling bodies (or promising bytes they never send) tie up no worker."""
    import socket

    slow = []
    for _ in range(40):
        sock = socket.create_connection(("127.0.0.1", stack.port))
        sock.sendall(
            b"POST /api/v1/instances HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/dicom\r\n"
            b"Authorization: Bearer " + network.keys["own"].encode() + b"\r\nContent-Length: 1000000\r\n\r\nDICM"
        )
        slow.append(sock)
    try:
        for _ in range(5):
            response = httpx.get(
                f"{stack.url}/api/v1/deliveries?wait=0",
                # A starved portal never answers; a busy one may take a while.
                timeout=30,
                headers={"Authorization": f"Bearer {network.keys['partner']}"},
            )
            assert response.status_code == 200
    finally:
        for sock in slow:
            sock.close()


def test_an_upload_over_the_limit_is_refused_before_it_is_read(stack, network):
    import socket

    with socket.create_connection(("127.0.0.1", stack.port), timeout=30) as sock:
        sock.sendall(
            b"POST /api/v1/instances HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/dicom\r\n"
            b"Authorization: Bearer " + network.keys["own"].encode() + b"\r\n"
            b"Content-Length: 10995116277760\r\n\r\n"
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")


def test_the_api_refuses_bad_keys_over_http(stack, network):
    response = httpx.get(f"{stack.url}/api/v1/deliveries", headers={"Authorization": "Bearer dx_wrong"}, timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]


def test_a_revoked_key_stops_the_agent(stack, network, tmp_path):
    key = stack.issue_key(f"own-{network.s}")
    stack.manage(
        "shell",
        "-c",
        (
            "from centers.models import ApiKey; from centers.services import apikey_revoke, key_digest; "
            f"apikey_revoke(api_key=ApiKey.objects.get(digest=key_digest('{key}')))"
        ),
    )
    (tmp_path / "one.dcm").write_bytes(dicom_bytes("CT"))
    result = stack.agent(key, "send", str(tmp_path / "one.dcm"))
    assert result.returncode == 1
    assert hashlib.sha256(b"").hexdigest() not in result.stdout
