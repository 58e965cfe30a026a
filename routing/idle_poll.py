"""The answer to an idle agent's poll, on the event loop, in one query.

Most polls of `GET /api/v1/deliveries?wait=0` find the queue empty. Going
through Django and REST framework costs a worker thread, the key lookup, the
queue check and the rendering: milliseconds of CPU for an empty list. This
ASGI layer answers `[]` itself only when one read proves everything the full
path would check: the key is live, its center active and allowed to receive,
its last use recorded recently enough, and nothing is available to lease.
Any other case (no or unknown key, a queue with work, a wait, odd parameters,
a last use to record) goes to Django unchanged, so errors, leases and audit
rows are never answered here.
"""

import asyncio
import re
from urllib.parse import parse_qsl

from django.conf import settings
from django.http.request import split_domain_port, validate_host

from centers.services import LAST_USED_RESOLUTION, key_digest

PATH = "/api/v1/deliveries"
_NUMBER = re.compile(r"\d{1,6}")
_QUERY = """
SELECT NOT EXISTS (
    SELECT 1 FROM routing_delivery d
    WHERE d.center_id = c.id
      AND (d.status = 'queued' OR (d.status = 'leased' AND d.lease_expires_at < now()))
)
FROM centers_apikey k JOIN centers_center c ON c.id = k.center_id
WHERE k.digest = %s AND k.revoked_at IS NULL AND c.is_active AND c.may_subscribe
  AND k.last_used_at > now() - make_interval(secs => %s)
"""
_EMPTY = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
        (b"allow", b"GET, OPTIONS"),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"same-origin"),
        (b"cross-origin-opener-policy", b"same-origin"),
    ],
}


class IdlePollFastPath:
    def __init__(self, app) -> None:
        self.app = app
        self.pool = None
        self.pool_lock = asyncio.Lock()
        database = settings.DATABASES["default"]
        self.enabled = database["ENGINE"] == "django.db.backends.postgresql"
        self.database = database

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.enabled and scope["path"] == PATH and scope["method"] == "GET":
            digest = self._idle_poll_key(scope)
            if digest is not None and await self._nothing_to_lease(digest):
                await send(_EMPTY)
                await send({"type": "http.response.body", "body": b"[]"})
                return None
        return await self.app(scope, receive, send)

    def _idle_poll_key(self, scope) -> str | None:
        """The key's digest when this is a plain `wait=0` poll from an allowed host, else None."""
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        domain, _ = split_domain_port(host)
        if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
            return None
        for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if name == "wait" and not (_NUMBER.fullmatch(value) and int(value) == 0):
                return None
            if name == "limit" and not (_NUMBER.fullmatch(value) and int(value) >= 1):
                return None
        authorization = headers.get(b"authorization", b"").split()
        if len(authorization) != 2 or authorization[0].lower() != b"bearer":
            return None
        try:
            return key_digest(authorization[1].decode("ascii"))
        except UnicodeDecodeError:
            return None

    async def _nothing_to_lease(self, digest: str) -> bool:
        pool = await self._pool()
        async with pool.connection() as connection:
            cursor = await connection.execute(_QUERY, (digest, LAST_USED_RESOLUTION.total_seconds() / 2))
            row = await cursor.fetchone()
        return bool(row and row[0])

    async def _pool(self):
        async with self.pool_lock:
            return await self._open_pool()

    async def _open_pool(self):
        if self.pool is None:
            from psycopg.conninfo import make_conninfo
            from psycopg_pool import AsyncConnectionPool

            db = self.database
            conninfo = make_conninfo(
                dbname=db["NAME"],
                user=db.get("USER") or None,
                password=db.get("PASSWORD") or None,
                host=db.get("HOST") or None,
                port=db.get("PORT") or None,
            )
            pool = AsyncConnectionPool(conninfo, min_size=1, max_size=4, open=False, kwargs={"autocommit": True})
            await pool.open()
            self.pool = pool
        return self.pool
