"""The production entry point: uvicorn serves this.

Under ASGI the event loop reads request bodies (spooling large ones to disk)
before a view runs, so a client that uploads at one byte a second ties up a
coroutine, not a worker thread. BodySizeLimit stops bodies past the upload
limit before they are spooled, whether or not the client declared a length.
"""

import json
import os
import threading

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_application = get_asgi_application()

from django.conf import settings  # noqa: E402  (needs the settings set up above)

from routing.idle_poll import IdlePollFastPath  # noqa: E402


class BodySizeLimit:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)

        seen = 0
        exceeded = False
        started = False

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    # Django stops reading on a disconnect and answers nothing;
                    # the 413 below is then the only answer.
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)
        if exceeded and not started:
            await self._too_large(send)

    async def _too_large(self, send):
        body = json.dumps(
            {"error": f"The upload is larger than this portal's limit of {self.max_bytes} bytes."}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class DisconnectSignal:
    """Puts a threading.Event in the scope that is set when the client goes away.

    A long poll runs in a worker thread that Django cannot cancel; without this
    it would keep polling for a vanished agent and lease deliveries nobody will
    fetch, which then wait out the whole lease before anyone else may have them.
    """

    SCOPE_KEY = "exchange.disconnected"

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        disconnected = threading.Event()

        async def watched_receive():
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
            return message

        return await self.app({**scope, self.SCOPE_KEY: disconnected}, watched_receive, send)


application = DisconnectSignal(IdlePollFastPath(BodySizeLimit(django_application, settings.DICOM_MAX_UPLOAD_BYTES)))
