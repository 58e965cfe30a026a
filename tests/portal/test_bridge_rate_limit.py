"""portal.bridge refuses a key past its rate on the event loop, before the body is read.

A real uvicorn (httptools, as deployed) serves the bridge; raw sockets send a
request's head and only part of its body, so the 429 is seen to come first.
"""

import json
import socket
import threading

import httpx
import pytest
import uvicorn

from centers.ratelimit import MemoryCounter, parse_rate
from portal.bridge import DRAIN_BYTES, RATE_COUNTED, BufferedWSGIBridge
from tests.integration.stack import free_port, wait_for


class Recorder:
    """A WSGI app that reads the whole body and remembers what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool, int]] = []

    def __call__(self, environ, start_response):
        size = len(environ["wsgi.input"].read())
        self.seen.append((environ["PATH_INFO"], environ[RATE_COUNTED], size))
        start_response("201 Created", [("Content-Type", "application/json"), ("Content-Length", "12")])
        return [b'{"ok": true}']


@pytest.fixture
def serve():
    servers = []

    def start(rate: str) -> tuple[int, Recorder]:
        app = Recorder()
        bridge = BufferedWSGIBridge(
            app, threads=4, spool_in_memory=1024, counter=MemoryCounter(), rate=parse_rate(rate)
        )
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(bridge, host="127.0.0.1", port=port, http="httptools", lifespan="off", log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_for(lambda: server.started, timeout=30, what="uvicorn")
        return port, app

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(30)


def head(path: str, key: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: portal\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/dicom\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def post(port: int, path: str, key: str, body: bytes = b"x" * 100) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head(path, key, len(body)) + body)
        return read_response(sock)[0]


def test_a_key_past_its_rate_is_answered_429_before_its_body_is_sent_and_the_connection_serves_on(serve):
    port, app = serve("2/m")
    assert [post(port, "/api/v1/instances", "flooder") for _ in range(2)] == [201, 201]
    declared = 1024 * 1024

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head("/api/v1/instances", "flooder", declared) + b"x" * 1000)
        status, headers, body = read_response(sock)

        assert status == 429
        assert 1 <= int(headers["retry-after"]) <= 60
        assert headers["content-type"] == "application/json"
        assert "throttled" in json.loads(body)["error"].lower()
        assert len(app.seen) == 2  # no thread ran Django for it

        # The rest of the refused body is dropped as it comes; the next request on the
        # same connection, another center's, is served.
        sock.sendall(b"x" * (declared - 1000) + head("/api/v1/instances", "steady", 5) + b"hello")
        assert read_response(sock)[0] == 201

    assert app.seen[-1] == ("/api/v1/instances", True, 5)


def test_a_refused_body_too_large_to_drop_closes_the_connection_after_the_429(serve):
    port, app = serve("1/m")
    assert post(port, "/api/v1/instances", "flooder") == 201

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head("/api/v1/instances", "flooder", DRAIN_BYTES + 1) + b"x" * 1000)
        status, headers, _ = read_response(sock)

        assert status == 429 and headers["connection"] == "close"
        try:
            assert sock.recv(65536) == b""
        except ConnectionResetError:
            pass  # closed with part of the body unread: a reset is a close too
    assert len(app.seen) == 1


def test_dicomweb_stow_counts_against_the_key_and_health_sessions_and_pages_do_not(serve):
    port, app = serve("1/m")

    assert [post(port, "/api/v1/health", "k") for _ in range(3)] == [201] * 3
    assert [post(port, "/studies/", "k") for _ in range(3)] == [201] * 3
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        sessions = [client.post("/dicomweb/studies", content=b"x", headers={"Cookie": "sessionid=s"}) for _ in range(3)]
    assert [r.status_code for r in sessions] == [201] * 3

    assert [post(port, "/dicomweb/studies", "k") for _ in range(2)] == [201, 429]
    assert post(port, "/api/v1/deliveries", "k") == 429
    # What the bridge counted is marked, so REST framework's throttle does not count it again.
    counted = {path: flag for path, flag, _ in app.seen}
    assert counted == {"/api/v1/health": False, "/studies/": False, "/dicomweb/studies": True}


def test_without_a_rate_nothing_is_counted_or_refused(serve):
    port, app = serve("")
    assert [post(port, "/api/v1/instances", "k") for _ in range(5)] == [201] * 5
    assert {flag for _, flag, _ in app.seen} == {False}
