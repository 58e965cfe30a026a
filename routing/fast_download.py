"""A delivery's file sent from the event loop, without a Django request, when no nginx sends it.

`GET /api/v1/deliveries/<id>/file` through Django costs a worker thread, the
key lookup, the delivery lookup, an audit INSERT and a FileResponse read in 4 KB
blocks: about a millisecond of CPU before the first byte, which five agents
fetching small files turn into the portal's ceiling. This ASGI layer answers
the common case itself: a live key on an active center, recently used, asking
for one of its own leased deliveries whose stored file is on local disk. One
query checks all of it; the file is read in threads, a megabyte at a time, and
sent with the same headers as DeliveryFileView.

Every download sent here is audited before its first byte, as through Django:
concurrent downloads share one INSERT (DownloadAudit), so a batch costs one
round trip, not one each.

Anything else goes to Django unchanged, so its answers stay its own: no or an
unknown key (401), another center's delivery or none (404), a delivery not
leased, a key whose last use is due to be recorded, a stored file missing or of
the wrong size (Django fails the delivery and answers 410), a plain-HTTP request
Django would redirect to HTTPS, a cross-origin request, a database that does
not answer. With DICOM_ACCEL_REDIRECT (nginx sends the file) or S3 storage
(presigned URLs) this layer stands aside.
"""

import asyncio
import ipaddress
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from django.conf import settings
from django.core.files.storage import storages

from centers.services import LAST_USED_RESOLUTION
from portal.bridge import RATE_COUNTED, limited_identity, refuse
from routing.loop_db import HostCheck, LoopDatabase, bearer_digest

logger = logging.getLogger(__name__)

# Django's <int:delivery_id>, bounded to what a bigint holds.
PATH = re.compile(r"/api/v1/deliveries/([0-9]{1,18})/file")
# Bytes read from disk and handed to uvicorn per send; uvicorn waits for the socket to
# drain between sends, so a download holds at most about this much in memory.
CHUNK_BYTES = 1024 * 1024
# Threads per web process reading stored files (open, stat, read).
READ_THREADS = 8
# The full path records a key's use once the last is older than this: it must see those requests.
LAST_USED_WINDOW = LAST_USED_RESOLUTION.total_seconds()
_QUERY = """
SELECT k.id, k.center_id, k.last_used_at + make_interval(secs => %s) > now(),
       d.status = 'leased', i.file, i.size, i.sha256, i.sop_instance_uid
FROM centers_apikey k
JOIN centers_center c ON c.id = k.center_id
JOIN routing_delivery d ON d.id = %s AND d.center_id = k.center_id
JOIN routing_instance i ON i.id = d.instance_id
WHERE k.digest = %s AND k.revoked_at IS NULL AND c.is_active AND k.last_used_at IS NOT NULL
"""
# The row audit_record writes for a download through Django (routing.api.DeliveryFileView).
_AUDIT = """
INSERT INTO centers_auditevent (at, action, center_id, user_id, api_key_id, object_type, object_id, address, detail)
SELECT now(), 'delivery.download', center_id, NULL, api_key_id, 'delivery', object_id, address,
       jsonb_build_object('sop_instance_uid', sop_instance_uid)
FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::inet[], %s::text[])
     AS t(center_id, api_key_id, object_id, address, sop_instance_uid)
"""
# What Django's middleware and REST framework add to DeliveryFileView's answer.
_DJANGO_HEADERS = [
    (b"allow", b"GET, HEAD, OPTIONS"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


@dataclass(frozen=True, slots=True)
class Download:
    delivery_id: int
    api_key_id: int
    center_id: int
    file: str
    size: int
    sha256: str
    sop_instance_uid: str


class DownloadAudit:
    """The `delivery.download` rows, written together: each caller waits for the INSERT holding its row.

    While one INSERT runs, the downloads that arrive wait for the next, which then
    carries all of them. A failed INSERT fails every caller in it.
    """

    def __init__(self, db: LoopDatabase) -> None:
        self.db = db
        self.pending: list[tuple[Download, str | None, asyncio.Future]] = []
        self.writer: asyncio.Task | None = None

    async def record(self, download: Download, address: str | None) -> None:
        done = asyncio.get_running_loop().create_future()
        self.pending.append((download, address, done))
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(self._write())
        await done

    async def _write(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    await self._insert(batch)
                except Exception as exc:  # noqa: BLE001 (each waiting download hands itself to Django)
                    for *_, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                else:
                    for *_, done in batch:
                        if not done.done():
                            done.set_result(None)
        finally:
            self.writer = None

    async def _insert(self, batch: list[tuple[Download, str | None, asyncio.Future]]) -> None:
        pool = await self.db.get()
        async with pool.connection() as connection:
            await connection.execute(
                _AUDIT,
                (
                    [d.center_id for d, _, _ in batch],
                    [d.api_key_id for d, _, _ in batch],
                    [str(d.delivery_id) for d, _, _ in batch],
                    [address for _, address, _ in batch],
                    [d.sop_instance_uid for d, _, _ in batch],
                ),
            )


class DeliveryFileFastPath:
    def __init__(self, app, *, db: LoopDatabase, counter=None, rate=None) -> None:
        self.app = app
        self.db = db
        self.enabled = db.enabled and settings.STORAGE_BACKEND == "local" and not settings.DICOM_ACCEL_REDIRECT
        self.counter = counter if rate is not None else None
        self.rate = rate
        self.audit = DownloadAudit(db)
        self.storage = storages["dicom"] if self.enabled else None
        self.reader = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="download")
        self._host_allowed = HostCheck()

    async def __call__(self, scope, receive, send):
        if self.enabled and scope["type"] == "http" and scope["method"] == "GET":
            match = PATH.fullmatch(scope["path"])
            if match is not None:
                return await self._download(int(match.group(1)), scope, receive, send)
        return await self.app(scope, receive, send)

    async def _download(self, delivery_id: int, scope, receive, send):
        # The key's budget first, as portal.bridge counts it; a request handed on is not counted twice.
        if self.counter is not None and (identity := limited_identity(scope)) is not None:
            verdict = await self.counter.ahit(identity, self.rate)
            if not verdict.allowed:
                return await refuse(scope, send, verdict.retry_after)
            scope = {**scope, RATE_COUNTED: True}
        plain = self._plain_request(scope)
        if plain is None:
            return await self.app(scope, receive, send)
        authorization, secure = plain
        download = await self._lookup(delivery_id, authorization)
        if download is None:
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        opened = await loop.run_in_executor(self.reader, self._open, download)
        if opened is None:
            return await self.app(scope, receive, send)
        fd, first = opened
        try:
            try:
                await self.audit.record(download, _address(scope))
            except Exception as exc:  # noqa: BLE001 (the database is away: Django answers, as it would have)
                logger.warning("download audit failed (%s); delivery %s goes through Django", exc, delivery_id)
                return await self.app(scope, receive, send)
            await send({"type": "http.response.start", "status": 200, "headers": self._headers(download, secure)})
            await self._send_body(fd, first, download.size, receive, send)
        finally:
            os.close(fd)
        return None

    def _plain_request(self, scope) -> tuple[bytes, bool] | None:
        """The Authorization header and whether the request came over HTTPS, when Django would answer
        it as the view does; else None."""
        wanted = {b"host": b"", b"authorization": b"", b"x-forwarded-proto": None}
        for name, value in scope["headers"]:
            if name in wanted:
                wanted[name] = value
            elif name == b"origin":
                return None  # a browser's cross-origin request: the CORS middleware decides
        if not self._host_allowed(wanted[b"host"]):
            return None
        proxy = settings.SECURE_PROXY_SSL_HEADER
        forwarded = wanted[b"x-forwarded-proto"]
        if proxy and forwarded is not None:
            secure = forwarded.decode("latin-1").split(",")[0].strip() == proxy[1]
        else:
            secure = scope.get("scheme") == "https"
        if settings.SECURE_SSL_REDIRECT and not secure:
            return None  # Django redirects it to HTTPS
        return wanted[b"authorization"], secure

    async def _lookup(self, delivery_id: int, authorization: bytes) -> Download | None:
        digest = bearer_digest(authorization)
        if digest is None:
            return None
        import psycopg

        try:
            pool = await self.db.get()
            async with pool.connection() as connection:
                cursor = await connection.execute(_QUERY, (LAST_USED_WINDOW, delivery_id, digest))
                row = await cursor.fetchone()
        except psycopg.Error:
            return None  # the database is restarting or unreachable: Django answers (503) meanwhile
        if row is None:
            return None
        api_key_id, center_id, recently_used, leased, file, size, sha256, sop_instance_uid = row
        if not (recently_used and leased):
            return None
        return Download(delivery_id, api_key_id, center_id, file, size, sha256, sop_instance_uid)

    def _open(self, download: Download) -> tuple[int, bytes] | None:
        """The stored file, open, and its first chunk; None when it is missing or not the size stored."""
        try:
            fd = os.open(self.storage.path(download.file), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size != download.size:
                os.close(fd)
                return None
            return fd, os.read(fd, min(download.size, CHUNK_BYTES))
        except BaseException:
            os.close(fd)
            raise

    def _headers(self, download: Download, secure: bool) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"content-type", b"application/dicom"),
            (b"content-length", str(download.size).encode()),
            (b"content-disposition", f'attachment; filename="{download.sop_instance_uid}.dcm"'.encode()),
            (b"x-checksum-sha256", download.sha256.encode()),
            *_DJANGO_HEADERS,
        ]
        if secure and settings.SECURE_HSTS_SECONDS:
            value = f"max-age={settings.SECURE_HSTS_SECONDS}"
            if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS:
                value += "; includeSubDomains"
            if settings.SECURE_HSTS_PRELOAD:
                value += "; preload"
            headers.append((b"strict-transport-security", value.encode()))
        return headers

    async def _send_body(self, fd: int, first: bytes, size: int, receive, send) -> None:
        sent = len(first)
        if sent >= size:
            await send({"type": "http.response.body", "body": first})
            return
        # uvicorn drops what is sent after a hang-up: stop reading the file then.
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(receive, gone))
        loop = asyncio.get_running_loop()
        try:
            await send({"type": "http.response.body", "body": first, "more_body": True})
            while sent < size and not gone.is_set():
                chunk = await loop.run_in_executor(self.reader, os.read, fd, min(size - sent, CHUNK_BYTES))
                if not chunk:
                    # The file shrank after the check: end the response short, as a
                    # FileResponse would; the agent's length and checksum checks catch it.
                    logger.error("stored file of delivery shrank while it was sent (%d of %d bytes)", sent, size)
                    break
                sent += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": sent < size})
        finally:
            watcher.cancel()


def _address(scope) -> str | None:
    """The client's IP address for the audit row, None when there is none (a Unix socket)."""
    client = scope.get("client")
    if not client:
        return None
    try:
        return str(ipaddress.ip_address(client[0]))
    except ValueError:
        return None


async def _watch_disconnect(receive, gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return
