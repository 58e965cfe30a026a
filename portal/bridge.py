"""Django's synchronous (WSGI) handler served by an ASGI server, each body read first.

uvicorn's event loop reads a request body to its end, spooled to disk past
FILE_UPLOAD_MAX_MEMORY_SIZE, before a thread runs Django, as Django's own ASGI
handler does: a client uploading at one byte a second costs a coroutine, never
a thread. Django then runs its plain synchronous path in that one thread.
Django's ASGI handler instead hops between the event loop and threads for the
request signals, the middleware chain and the view; measured on an upload,
those hand-offs cost about as much CPU as the upload's own work.

The request's environ carries DISCONNECTED, a threading.Event set when the
client hangs up, so a long poll stops waiting for an agent that is gone.
"""

import asyncio
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from tempfile import SpooledTemporaryFile

DISCONNECTED = "exchange.disconnected"
# Response bytes are handed to the event loop in pieces of about this size:
# Django's FileResponse yields 4 KB blocks, one loop round trip each otherwise.
SEND_BYTES = 1024 * 1024


class BufferedWSGIBridge:
    def __init__(self, app: Callable, *, threads: int, spool_in_memory: int, spool_dir: str | None = None) -> None:
        self.app = app
        self.spool_in_memory = spool_in_memory
        self.spool_dir = spool_dir
        # Long polls hold a thread while they wait: the pool is sized for many of them.
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="django")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"BufferedWSGIBridge serves HTTP only, not {scope['type']!r}")
        body = SpooledTemporaryFile(max_size=self.spool_in_memory, mode="w+b", dir=self.spool_dir)
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # gone before the body was complete: nothing to answer
                body.write(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            size = body.tell()
            body.seek(0)
            disconnected = threading.Event()
            watcher = asyncio.ensure_future(_watch_disconnect(receive, disconnected))
            try:
                environ = build_environ(scope, body, size, disconnected)
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self.executor, self._respond, environ, send, loop)
            finally:
                watcher.cancel()
        finally:
            body.close()

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
