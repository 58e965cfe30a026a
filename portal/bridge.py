"""Django's synchronous (WSGI) handler served by an ASGI server, each body read first.

uvicorn's event loop reads a request body to its end, spooled to disk past
FILE_UPLOAD_MAX_MEMORY_SIZE, before a thread runs Django, as Django's own ASGI
handler does: a client uploading at one byte a second costs a coroutine, never
a thread. Django then runs its plain synchronous path in that one thread. A
batch upload's body goes instead to a receiver that writes each instance
straight to its own file as it arrives (receiver_for, routing.batch.batch_receiver),
so its bytes are not spooled and then copied again.
Django's ASGI handler instead hops between the event loop and threads for the
request signals, the middleware chain and the view; measured on an upload,
those hand-offs cost about as much CPU as the upload's own work.

The request's environ carries DISCONNECTED, a threading.Event set when the
client hangs up, so a long poll stops waiting for an agent that is gone.

A key past its budget (centers.ratelimit) is refused here, before its body is
read and before a thread is taken: a flooding center's refused uploads cost the
event loop a hash and a counter, not a spooled body, a key lookup and a thread.
The answer goes out at once; the unread body then streams into uvicorn's
parser, which drops it and keeps the connection for the next request, or, past
DRAIN_BYTES, the connection is closed instead. A counted request's environ
carries RATE_COUNTED, so REST framework's throttle does not count it again.
"""

import asyncio
import io
import json
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from tempfile import SpooledTemporaryFile
from typing import Protocol

from centers.ratelimit import MemoryCounter, Rate, RedisCounter, bearer_identity

DISCONNECTED = "exchange.disconnected"
# The body's receiver (routing.batch.BatchReceiver), where one took the body instead of the spool.
RECEIVED_BODY = "exchange.received_body"
RATE_COUNTED = "exchange.rate_counted"
# The requests a key's budget covers: the agent API and DICOMweb, by Bearer key.
LIMITED_PREFIXES = ("/api/v1/", "/dicomweb/")
UNLIMITED_PATHS = frozenset({"/api/v1/health"})
# A refused request's unread body up to this size is dropped by uvicorn's parser as it
# arrives and the connection kept; a larger one closes the connection instead. Closing at
# once resets a connection whose body is still coming, and a client (or a proxy) that is
# still writing may then see the reset before the 429.
DRAIN_BYTES = 16 * 1024 * 1024
# Response bytes are handed to the event loop in pieces of about this size:
# Django's FileResponse yields 4 KB blocks, one loop round trip each otherwise.
SEND_BYTES = 1024 * 1024


class BodyReceiver(Protocol):
    """Takes a body as it arrives instead of the spool; the app finds it in the environ (RECEIVED_BODY)."""

    def feed(self, chunk: bytes) -> None: ...

    def close(self) -> None: ...

    def discard(self) -> None:
        """Undo what the app did not keep, once the answer is sent or the client is gone."""


class BufferedWSGIBridge:
    def __init__(
        self,
        app: Callable,
        *,
        threads: int,
        spool_in_memory: int,
        spool_dir: str | None = None,
        counter: MemoryCounter | RedisCounter | None = None,
        rate: Rate | None = None,
        receiver_for: Callable[[dict], BodyReceiver | None] | None = None,
    ) -> None:
        self.app = app
        self.receiver_for = receiver_for
        self.counter = counter if rate is not None else None
        self.rate = rate
        self.spool_in_memory = spool_in_memory
        self.spool_dir = spool_dir
        # Long polls hold a thread while they wait: the pool is sized for many of them.
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="django")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"BufferedWSGIBridge serves HTTP only, not {scope['type']!r}")
        # An ASGI layer in front (routing.fast_download) may have counted it already.
        counted = bool(scope.get(RATE_COUNTED))
        if not counted and self.counter is not None and (identity := limited_identity(scope)) is not None:
            verdict = await self.counter.ahit(identity, self.rate)
            if not verdict.allowed:
                return await refuse(scope, send, verdict.retry_after)
            counted = True
        receiver = self.receiver_for(scope) if self.receiver_for is not None else None
        if receiver is None:
            body = SpooledTemporaryFile(max_size=self.spool_in_memory, mode="w+b", dir=self.spool_dir)
        else:
            body = io.BytesIO()
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # gone before the body was complete: nothing to answer
                if receiver is None:
                    body.write(message.get("body", b""))
                elif chunk := message.get("body"):
                    receiver.feed(chunk)
                if not message.get("more_body", False):
                    break
            if receiver is not None:
                receiver.close()
            size = body.tell()
            body.seek(0)
            disconnected = threading.Event()
            watcher = asyncio.ensure_future(_watch_disconnect(receive, disconnected))
            try:
                environ = build_environ(scope, body, size, disconnected)
                environ[RATE_COUNTED] = counted
                environ[RECEIVED_BODY] = receiver
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self.executor, self._respond, environ, send, loop)
            finally:
                watcher.cancel()
        finally:
            body.close()
            if receiver is not None:
                receiver.discard()

    def _respond(self, environ: dict, send, loop: asyncio.AbstractEventLoop) -> None:
        """Run Django in this thread and pass its answer to the event loop piece by piece."""

        def deliver(message: dict) -> None:
            asyncio.run_coroutine_threadsafe(send(message), loop).result()

        started: list = []

        def start_response(status: str, headers: list, exc_info=None):
            started[:] = [
                int(status.split(" ", 1)[0]),
                [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            ]

        result: Iterable[bytes] = self.app(environ, start_response)
        try:
            pending: list[bytes] = []
            pending_size = 0
            head_sent = False
            for chunk in result:
                if not chunk:
                    continue
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= SEND_BYTES:
                    if not head_sent:
                        deliver({"type": "http.response.start", "status": started[0], "headers": started[1]})
                        head_sent = True
                    deliver({"type": "http.response.body", "body": b"".join(pending), "more_body": True})
                    pending, pending_size = [], 0
            if not head_sent:
                deliver({"type": "http.response.start", "status": started[0], "headers": started[1]})
            deliver({"type": "http.response.body", "body": b"".join(pending), "more_body": False})
        finally:
            # Django's request_finished fires here: the database connection goes back to the pool.
            close = getattr(result, "close", None)
            if close is not None:
                close()


def limited_identity(scope: dict) -> str | None:
    path = scope["path"]
    if not path.startswith(LIMITED_PREFIXES) or path in UNLIMITED_PATHS:
        return None
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return bearer_identity(value)
    return None  # a browser's session, or nobody: Django answers, unlimited here


async def refuse(scope: dict, send, retry_after: int) -> None:
    body = json.dumps(
        {"error": f"Request was throttled: this key is past its rate. Expected available in {retry_after} seconds."}
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
    ]
    declared = next((value for name, value in scope.get("headers", []) if name == b"content-length"), b"0")
    chunked = any(name == b"transfer-encoding" for name, _ in scope.get("headers", []))
    if chunked or not declared.isdigit() or int(declared) > DRAIN_BYTES:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _watch_disconnect(receive, disconnected: threading.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            return


def build_environ(scope: dict, body, size: int, disconnected: threading.Event) -> dict:
    """PEP 3333's environ for an ASGI HTTP scope whose body is already read."""
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client")
    environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode("utf-8").decode("latin-1"),
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]) if server[1] is not None else "80",
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "CONTENT_LENGTH": str(size),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        DISCONNECTED: disconnected,
    }
    if client:
        environ["REMOTE_ADDR"] = client[0]
        environ["REMOTE_PORT"] = str(client[1])
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        if name == "CONTENT_LENGTH":
            continue  # the body's real size, set above, whatever the client declared
        if name != "CONTENT_TYPE":
            name = "HTTP_" + name
        if name in environ:
            value = environ[name] + ("; " if name == "HTTP_COOKIE" else ",") + value
        environ[name] = value
    return environ
