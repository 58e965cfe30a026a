"""portal.bridge: Django's synchronous handler behind uvicorn, each body read first."""

import asyncio
import threading

from portal.bridge import DISCONNECTED, RECEIVED_BODY, SEND_BYTES, BufferedWSGIBridge, build_environ


def serve(app, messages, scope_overrides=None, receiver_for=None):
    """Run one request through the bridge; returns what was sent and the environ the app saw."""
    seen = {}

    def wrapped(environ, start_response):
        seen["environ"] = environ
        seen["body"] = environ["wsgi.input"].read()
        return app(environ, start_response)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/v1/instances",
        "query_string": b"a=1&b=%C3%A9",
        "root_path": "",
        "headers": [(b"host", b"portal.example"), (b"content-type", b"application/dicom")],
        "server": ("127.0.0.1", 8000),
        "client": ("10.1.2.3", 51000),
        "scheme": "http",
        "http_version": "1.1",
        **(scope_overrides or {}),
    }
    sent = []

    async def run():
        queue = list(messages)

        async def receive():
            if queue:
                return queue.pop(0)
            await asyncio.sleep(3600)  # the client stays connected

        async def send(message):
            sent.append(message)

        bridge = BufferedWSGIBridge(wrapped, threads=4, spool_in_memory=1024, receiver_for=receiver_for)
        await bridge(scope, receive, send)

    asyncio.run(run())
    return sent, seen


def ok(environ, start_response):
    start_response("201 Created", [("Content-Type", "application/json")])
    return [b'{"ok": true}']


def test_it_hands_django_the_whole_body_and_its_real_size_when_the_client_sent_it_chunked():
    chunks = [{"type": "http.request", "body": b"x" * 700, "more_body": True}] * 3 + [
        {"type": "http.request", "body": b"end", "more_body": False}
    ]
    sent, seen = serve(ok, chunks, {"headers": [(b"transfer-encoding", b"chunked"), (b"content-length", b"5")]})
    assert seen["body"] == b"x" * 2100 + b"end"
    assert seen["environ"]["CONTENT_LENGTH"] == "2103"
    assert sent[0]["status"] == 201
    assert sent[0]["headers"] == [(b"content-type", b"application/json")]
    assert sent[1] == {"type": "http.response.body", "body": b'{"ok": true}', "more_body": False}


def test_it_answers_nothing_when_the_client_hangs_up_before_the_body_ends():
    called = []

    def app(environ, start_response):
        called.append(environ)
        return ok(environ, start_response)

    sent, _ = serve(app, [{"type": "http.request", "body": b"abc", "more_body": True}, {"type": "http.disconnect"}])
    assert sent == [] and called == []


def test_a_streamed_answer_goes_out_in_pieces_and_is_closed():
    closed = threading.Event()

    class Blocks:
        def __iter__(self):
            for _ in range(3 * SEND_BYTES // 4096):
                yield b"b" * 4096

        def close(self):
            closed.set()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/dicom")])
        return Blocks()

    sent, _ = serve(app, [{"type": "http.request", "body": b"", "more_body": False}])
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert len(bodies) >= 3
    assert all(len(m["body"]) <= SEND_BYTES + 4096 for m in bodies)
    assert b"".join(m["body"] for m in bodies) == b"b" * (3 * SEND_BYTES // 4096 * 4096)
    assert [m["more_body"] for m in bodies][-1] is False
    assert closed.is_set()


def test_the_app_learns_that_the_client_hung_up_while_it_runs():
    def app(environ, start_response):
        assert environ[DISCONNECTED].wait(60), "the hang-up was never signalled"
        start_response("200 OK", [])
        return [b"[]"]

    messages = [{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}]
    sent, seen = serve(app, messages, {"method": "GET"})
    assert seen["environ"][DISCONNECTED].is_set()


class Recorder:
    """A body receiver that keeps what it was given, and when."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.events: list[str] = []

    def feed(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def close(self) -> None:
        self.events.append("close")

    def discard(self) -> None:
        self.events.append("discard")


def test_a_body_with_a_receiver_goes_to_it_piece_by_piece_and_not_to_the_spool():
    recorder = Recorder()

    def app(environ, start_response):
        recorder.events.append("app")
        assert environ[RECEIVED_BODY] is recorder
        return ok(environ, start_response)

    messages = [{"type": "http.request", "body": b"x" * 700, "more_body": True}] * 3 + [
        {"type": "http.request", "body": b"end", "more_body": False}
    ]
    sent, seen = serve(app, messages, receiver_for=lambda scope: recorder)
    assert recorder.chunks == [b"x" * 700] * 3 + [b"end"]
    assert seen["body"] == b"" and seen["environ"]["CONTENT_LENGTH"] == "0"
    # The app runs once the body is whole, and what it did not keep is undone after the answer.
    assert recorder.events == ["close", "app", "discard"]
    assert sent[0]["status"] == 201


def test_a_receiver_is_discarded_unread_when_the_client_hangs_up_mid_body():
    recorder = Recorder()
    messages = [{"type": "http.request", "body": b"abc", "more_body": True}, {"type": "http.disconnect"}]
    sent, _ = serve(ok, messages, receiver_for=lambda scope: recorder)
    assert sent == []
    assert recorder.chunks == [b"abc"] and recorder.events == ["discard"]


def test_a_request_the_receiver_does_not_take_is_spooled_as_before():
    sent, seen = serve(ok, [{"type": "http.request", "body": b"abc", "more_body": False}], receiver_for=lambda s: None)
    assert seen["body"] == b"abc" and seen["environ"][RECEIVED_BODY] is None


def test_the_environ_follows_pep_3333():
    scope = {
        "method": "GET",
        "path": "/dicomweb/studies/1.2.3",
        "root_path": "",
        "query_string": b"PatientName=%C3%A9*",
        "headers": [
            (b"host", b"portal.example"),
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"x-forwarded-for", b"10.0.0.2"),
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
            (b"content-type", b"multipart/related"),
        ],
        "server": ("127.0.0.1", 8000),
        "client": ("10.1.2.3", 51000),
        "scheme": "https",
        "http_version": "1.1",
    }
    environ = build_environ(scope, None, 0, threading.Event())
    assert environ["PATH_INFO"] == "/dicomweb/studies/1.2.3"
    assert environ["QUERY_STRING"] == "PatientName=%C3%A9*"
    assert environ["HTTP_X_FORWARDED_FOR"] == "10.0.0.1,10.0.0.2"
    assert environ["HTTP_COOKIE"] == "a=1; b=2"
    assert environ["CONTENT_TYPE"] == "multipart/related"
    assert "HTTP_CONTENT_TYPE" not in environ
    assert (environ["REMOTE_ADDR"], environ["SERVER_PORT"], environ["wsgi.url_scheme"]) == ("10.1.2.3", "8000", "https")
