"""HTTP 429 with Retry-After: the agent waits as long as the portal asks, and it never counts as a failure.

The portal here is a real HTTP server on loopback that answers from a script.
"""

import hashlib
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.client import RATE_LIMIT_CAP_SECONDS, RATE_LIMIT_DEFAULT_SECONDS, make_client, retry_after_seconds
from agent.config import load_settings
from agent.receive import Target, receive_once
from agent.send import Result, upload_file
from tests.dicomfiles import dicom_bytes


class ScriptedPortal(ThreadingHTTPServer):
    """Answers each request with the next (status, headers, body) of its path's script; logs when each came."""

    def __init__(self, scripts: dict[str, list[tuple[int, dict, object]]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.scripts = scripts
        self.requests: list[tuple[str, str, float]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        path = self.path.split("?")[0]
        self.server.requests.append((self.command, path, time.monotonic()))
        status, headers, body = self.server.scripts[path].pop(0)
        # Bytes are a file, anything else an API answer.
        data, media_type = (
            (body, "application/dicom") if isinstance(body, bytes) else (json.dumps(body).encode(), "application/json")
        )
        self.send_response(status)
        for name, value in {**headers, "Content-Type": media_type, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def portal_with():
    servers = []

    def start(scripts):
        server = ScriptedPortal(scripts)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def client_for(portal):
    return make_client(load_settings({"server": portal.url, "key": "k"}, {}), connections=2)


def test_an_upload_answered_429_waits_the_retry_after_and_is_not_an_attempt(portal_with, tmp_path):
    slow_down = (429, {"Retry-After": "1"}, {"error": "Too many uploads from this key."})
    portal = portal_with(
        {"/api/v1/instances": [slow_down, slow_down, (201, {}, {"sop_instance_uid": "1.2.3"})]},
    )
    path = tmp_path / "ct.dcm"
    path.write_bytes(dicom_bytes("CT"))
    with client_for(portal) as client:
        # One attempt only: the two 429s must not use it up.
        outcome = upload_file(client, path, attempts=1)
    assert (outcome.result, outcome.detail) == (Result.SENT, "SOP 1.2.3")
    times = [at for _, _, at in portal.requests]
    assert len(times) == 3
    assert times[1] - times[0] >= 1 and times[2] - times[1] >= 1


def test_a_429_cut_short_by_shutdown_leaves_the_file_for_later_uncounted(portal_with, tmp_path):
    portal = portal_with({"/api/v1/instances": [(429, {"Retry-After": "60"}, {})]})
    path = tmp_path / "ct.dcm"
    path.write_bytes(dicom_bytes("CT"))
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    with client_for(portal) as client:
        outcome = upload_file(client, path, attempts=1, stop=stop)
    assert (outcome.result, outcome.status_code) == (Result.FAILED, 429)
    assert len(portal.requests) == 1


def test_receive_waits_out_a_429_on_the_lease_and_the_ack(portal_with, tmp_path):
    data = dicom_bytes("CT", sop_uid="1.2.826.0.1.3680043.8.498.1")
    digest = hashlib.sha256(data).hexdigest()
    slow_down = (429, {"Retry-After": "1"}, {"error": "slow down"})
    delivery = {
        "id": 7,
        "sop_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "study_instance_uid": "1.2",
        "series_instance_uid": "1.3",
        "patient_id": "PAT-1",
        "sha256": digest,
        "download_url": "",
    }
    portal = portal_with(
        {
            "/api/v1/deliveries": [slow_down, (200, {}, [delivery]), (200, {}, [])],
            "/api/v1/deliveries/ack": [slow_down, (200, {}, {"results": [{"id": 7, "status": "delivered"}]})],
            "/file": [(200, {}, data)],
        }
    )
    delivery["download_url"] = f"{portal.url}/file"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with client_for(portal) as client:
        status, summary = receive_once(client, Target(inbox), limit=10)
    assert (status, summary) == (0, "1 received, 0 already present, 0 failed")
    assert [(method, path) for method, path, _ in portal.requests] == [
        ("GET", "/api/v1/deliveries"),
        ("GET", "/api/v1/deliveries"),
        ("GET", "/file"),
        ("POST", "/api/v1/deliveries/ack"),
        ("POST", "/api/v1/deliveries/ack"),
        ("GET", "/api/v1/deliveries"),
    ]
    [received] = inbox.rglob("*.dcm")
    assert received.read_bytes() == data


def test_retry_after_is_read_as_seconds_or_an_http_date():
    now = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    assert retry_after_seconds("7") == 7
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now) == 0
    assert retry_after_seconds(None) == retry_after_seconds("soon") == RATE_LIMIT_DEFAULT_SECONDS
    assert retry_after_seconds("999999") == RATE_LIMIT_CAP_SECONDS


def test_status_says_a_rate_limited_portal_is_reachable(portal_with):
    from agent.status import portal_check

    portal = portal_with({"/api/v1/agents/heartbeat": [(429, {"Retry-After": "30"}, {"error": "slow down"})]})
    with client_for(portal) as client:
        assert portal_check(client) == (
            False,
            "reachable, but it asks this key to slow down (HTTP 429, retry in 30 s)",
        )
