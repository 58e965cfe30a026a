"""The production entry point: uvicorn serves this.

The event loop reads request bodies (spooling large ones to disk) before a
view runs, so a client that uploads at one byte a second ties up a coroutine,
not a worker thread (portal.bridge). BodySizeLimit stops bodies past the
upload limit before they are spooled, whether or not the client declared a
length. An idle agent's poll is answered before Django (routing.idle_poll), and so
is a delivery's file on local storage without nginx (routing.fast_download); the two
share one small database pool. A key past its rate (API_RATE_LIMIT) is answered 429
before its body is read.
"""

import json
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_application = get_wsgi_application()

from django.conf import settings  # noqa: E402  (needs the settings set up above)
from django.urls import get_resolver  # noqa: E402

from centers.ratelimit import parse_rate  # noqa: E402
from centers.throttling import key_counter  # noqa: E402
from portal.bridge import BufferedWSGIBridge  # noqa: E402
from routing.batch import batch_receiver  # noqa: E402
from routing.fast_download import DeliveryFileFastPath  # noqa: E402
from routing.idle_poll import IdlePollFastPath  # noqa: E402
from routing.loop_db import LoopDatabase  # noqa: E402


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


# Django imports the URLconf, and every view module with it, on a process's first request:
# about 0.2 s of CPU that a worker's first upload would otherwise wait for, after every
# start and restart. Done here, it is paid before the worker accepts a connection.
get_resolver().url_patterns  # noqa: B018

database = LoopDatabase(settings.DATABASES["default"])
counter, rate = key_counter(), parse_rate(settings.API_RATE_LIMIT)
application = IdlePollFastPath(
    DeliveryFileFastPath(
        BodySizeLimit(
            BufferedWSGIBridge(
                django_application,
                threads=settings.WEB_THREADS,
                spool_in_memory=settings.FILE_UPLOAD_MAX_MEMORY_SIZE,
                spool_dir=settings.FILE_UPLOAD_TEMP_DIR,
                counter=counter,
                rate=rate,
                receiver_for=batch_receiver,
            ),
            settings.DICOM_MAX_UPLOAD_BYTES,
        ),
        db=database,
        counter=counter,
        rate=rate,
    ),
    db=database,
)
