"""The answer to an idle agent's poll, on the event loop, usually without a query.

Most polls of `GET /api/v1/deliveries?wait=0` find the queue empty. Going
through Django and REST framework costs a worker thread, the key lookup, the
queue check and the rendering: milliseconds of CPU for an empty list. This
ASGI layer answers `[]` itself only when it knows everything the full path
would check: the key is live, its center active and allowed to receive, its
last use recorded recently enough, and nothing is available to lease.
Any other case (no or unknown key, a queue with work, a wait, odd parameters,
a last use to record) goes to Django unchanged, so errors, leases and audit
rows are never answered here.

What it knows comes from one read, kept per process for at most CACHE_SECONDS
(IdleCache): which key digests belong to which allowed center, and which
centers have nothing to lease. Each worker LISTENs on `routing.notify.CHANNEL`;
the writes that queue deliveries or revoke access NOTIFY it at commit, so a
delivery queued after an idle answer is seen by the next poll. While that
connection is down the cache is empty and unused: every poll is read again.
"""

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl

from django.conf import settings

from centers.services import LAST_USED_RESOLUTION
from routing import notify
from routing.loop_db import HostCheck, LoopDatabase, bearer_digest

logger = logging.getLogger(__name__)

PATH = "/api/v1/deliveries"
# The longest any cached answer is trusted, notification or not: a revoked key,
# a deactivated center or a missed NOTIFY is served at most this long.
CACHE_SECONDS = 2.0
# The listener proves its connection alive this often when no notification comes.
PING_SECONDS = 5.0
# The fast path answers only while the key's last use is this recent: the full
# path records a use once the last one is older than LAST_USED_RESOLUTION, so it
# is never skipped. (Half of it, as before, left every poll of the other half
# minute to Django, which neither answered quickly nor recorded anything.)
LAST_USED_WINDOW = LAST_USED_RESOLUTION.total_seconds()
# The listener's application_name in pg_stat_activity.
LISTENER_NAME = "dx idle-poll listener"
_MAX_ENTRIES = 10_000
_NUMBER = re.compile(r"\d{1,6}")
_QUERY = """
SELECT c.id,
       extract(epoch FROM k.last_used_at + make_interval(secs => %s) - now()),
       NOT EXISTS (
           SELECT 1 FROM routing_delivery d
           JOIN routing_instance di ON di.id = d.instance_id
           JOIN routing_series ds ON ds.id = di.series_id
           WHERE d.center_id = c.id
             AND (d.status = 'queued' OR (d.status = 'leased' AND d.lease_expires_at < now()))
             -- deliver: study waits for its study to be stable (routing.delivery_services._study_stable). Not
             -- correlated: the few studies with a recent instance are read once and hashed.
             AND (NOT d.whole_study OR (ds.study_id NOT IN (
                 SELECT rs.study_id FROM routing_instance ri JOIN routing_series rs ON rs.id = ri.series_id
                 WHERE ri.received_at > now() - make_interval(secs => {stable})
             ) AND ds.study_id NOT IN (
                 SELECT cs.study_id FROM routing_instance ci
                 JOIN routing_series cs ON cs.id = ci.series_id
                 JOIN routing_instance co ON co.id = ci.derived_from_id
                 JOIN routing_series cos ON cos.id = co.series_id
                 WHERE cos.study_id IN (
                     SELECT ps.study_id FROM routing_deidentifiedcopy p
                     JOIN routing_instance po ON po.id = p.original_id
                     JOIN routing_series ps ON ps.id = po.series_id
                     WHERE p.status = 'pending'
                 ) AND ci.derived_for_id IN (SELECT center_id FROM routing_deidentifiedcopy WHERE status = 'pending')
             )))
       ),
       extract(epoch FROM (
           SELECT min(d.lease_expires_at) FROM routing_delivery d WHERE d.center_id = c.id AND d.status = 'leased'
       ) - now())
FROM centers_apikey k JOIN centers_center c ON c.id = k.center_id
WHERE k.digest = %s AND k.revoked_at IS NULL AND c.is_active AND c.may_subscribe AND k.last_used_at IS NOT NULL
"""


def idle_query(stable_seconds: float) -> str:
    """The query, with STUDY_STABLE_SECONDS written in.

    A literal, not a parameter: psycopg prepares a query used often, and the generic plan
    of a prepared statement cannot know how few instances a parameter's cut-off leaves,
    so it read them all (7 ms instead of 0.2 ms with 200,000 instances).
    """
    return _QUERY.replace("{stable}", repr(float(stable_seconds)))


_EMPTY_START = {
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
_EMPTY_BODY = {"type": "http.response.body", "body": b"[]"}

# IdleCache.answer()
EMPTY = "empty"  # answer [] now
ASK = "ask"  # not known: read the database
FULL_PATH = "full"  # known to need Django (a last use to record): no read


@dataclass(slots=True)
class _Key:
    center_id: int
    fresh_until: float  # the key's last use is recent enough to answer here until then
    expires: float


class IdleCache:
    """A worker's knowledge of keys and empty queues, each fact for at most `ttl` seconds.

    Used only while `live` (the listener is LISTENing). Every notification bumps
    `version`; a read that started before one is not stored, since it may have
    missed the change the notification announced.
    """

    def __init__(self, ttl: float = CACHE_SECONDS, clock=time.monotonic, max_entries: int = _MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.clock = clock
        self.max_entries = max_entries
        self.keys: dict[str, _Key] = {}
        self.empty: dict[int, float] = {}  # center id -> nothing to lease until then
        self.live = False
        self.version = 0

    def answer(self, digest: str) -> str:
        if not self.live:
            return ASK
        key = self.keys.get(digest)
        now = self.clock()
        if key is None or key.expires <= now:
            return ASK
        if key.fresh_until <= now:
            # One poll goes to Django, which records the key's use; the others are answered
            # here until the entry is read again. Sending them all, as before, put every poll
            # of a busy key in Django's threads for up to `ttl` seconds once a minute (p99 of
            # 455 and 647 ms in the bench's long-poll runs that met that minute, 17 and 22 ms
            # in the others).
            key.fresh_until = key.expires
            return FULL_PATH
        until = self.empty.get(key.center_id)
        if until is None or until <= now:
            return ASK
        return EMPTY

    def store(
        self,
        digest: str,
        *,
        version: int,
        center_id: int,
        fresh_for: float,
        nothing_to_lease: bool,
        first_lease_ends_in: float | None,
    ) -> None:
        """Keep one read's answer; `first_lease_ends_in` is when the center's earliest lease expires, if any."""
        if not self.live or version != self.version:
            return
        now = self.clock()
        if len(self.keys) >= self.max_entries:
            self.keys.clear()
        self.keys[digest] = _Key(center_id, now + fresh_for, now + self.ttl)
        if nothing_to_lease:
            # An expired lease is leasable again: "empty" ends when the first lease does.
            lasts = self.ttl if first_lease_ends_in is None else min(self.ttl, first_lease_ends_in)
            if len(self.empty) >= self.max_entries:
                self.empty.clear()
            self.empty[center_id] = now + lasts
        else:
            self.empty.pop(center_id, None)

    def notified(self, payload: str) -> None:
        self.version += 1
        kind, center_ids = notify.parse(payload)
        if center_ids is None or kind not in (notify.QUEUED, notify.KEYS):
            self.clear()
            return
        for center_id in center_ids:
            self.empty.pop(center_id, None)
        if kind == notify.KEYS:
            self.keys = {digest: key for digest, key in self.keys.items() if key.center_id not in center_ids}

    def clear(self) -> None:
        self.version += 1
        self.keys = {}
        self.empty = {}

    def up(self) -> None:
        """The listener is LISTENing: what was read before may have missed notifications."""
        self.clear()
        self.live = True

    def down(self) -> None:
        self.live = False
        self.clear()


class IdlePollFastPath:
    def __init__(self, app, *, db: LoopDatabase, cache_seconds: float = CACHE_SECONDS) -> None:
        self.app = app
        self.db = db
        self.cache = IdleCache(ttl=cache_seconds)
        self.listener: asyncio.Task | None = None
        self.enabled = self.db.enabled
        self.query = idle_query(settings.STUDY_STABLE_SECONDS)
        self._host_allowed = HostCheck()
        # Per-request parsing, remembered: a handful of agents send the same query.
        self._queries: dict[bytes, bool] = {}

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "http":
            if self.enabled and scope["path"] == PATH and scope["method"] == "GET":
                digest = self._idle_poll_key(scope)
                if digest is not None and await self._nothing_to_lease(digest):
                    await send(_EMPTY_START)
                    await send(_EMPTY_BODY)
                    return None
        elif kind == "lifespan":
            return await self._lifespan(receive, send)
        return await self.app(scope, receive, send)

    def _idle_poll_key(self, scope) -> str | None:
        """The key's digest when this is a plain `wait=0` poll from an allowed host, else None."""
        host = authorization = b""
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"authorization":
                authorization = value
        if not (self._host_allowed(host) and self._plain_query(scope.get("query_string", b""))):
            return None
        return bearer_digest(authorization)

    def _plain_query(self, query: bytes) -> bool:
        plain = self._queries.get(query)
        if plain is None:
            plain = True
            for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                if name == "wait" and not (_NUMBER.fullmatch(value) and int(value) == 0):
                    plain = False
                if name == "limit" and not (_NUMBER.fullmatch(value) and int(value) >= 1):
                    plain = False
            if len(self._queries) >= 256:
                self._queries.clear()
            self._queries[query] = plain
        return plain

    async def _nothing_to_lease(self, digest: str) -> bool:
        if self.listener is None:
            self.listener = asyncio.get_running_loop().create_task(self._listen())
        known = self.cache.answer(digest)
        if known != ASK:
            return known == EMPTY
        version = self.cache.version
        import psycopg

        try:
            pool = await self.db.get()
            async with pool.connection() as connection:
                cursor = await connection.execute(self.query, (LAST_USED_WINDOW, digest))
                row = await cursor.fetchone()
        except psycopg.Error:
            # The database is restarting or unreachable: Django answers instead, with a
            # 503 to retry while it lasts, never an error from this layer.
            return False
        if row is None:
            return False
        center_id, fresh_for, nothing_to_lease, first_lease_ends_in = row
        fresh_for = float(fresh_for)
        first_lease_ends_in = None if first_lease_ends_in is None else float(first_lease_ends_in)
        self.cache.store(
            digest,
            version=version,
            center_id=center_id,
            fresh_for=fresh_for,
            nothing_to_lease=nothing_to_lease,
            first_lease_ends_in=first_lease_ends_in,
        )
        return fresh_for > 0 and bool(nothing_to_lease)

    async def _listen(self) -> None:
        """LISTEN for as long as the worker lives, reconnecting; the cache is used only while it listens."""
        import psycopg

        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.db.conninfo(),
                    autocommit=True,
                    application_name=LISTENER_NAME,
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                ) as connection:
                    await connection.execute(f"LISTEN {notify.CHANNEL}")
                    self.cache.up()
                    delay = 0.5
                    while True:
                        async for message in connection.notifies(timeout=PING_SECONDS):
                            self.cache.notified(message.payload)
                        await asyncio.wait_for(connection.execute("SELECT 1"), PING_SECONDS)
            except asyncio.CancelledError:
                self.cache.down()
                raise
            except Exception as exc:  # the database restarted, the network dropped: read every poll meanwhile
                if self.cache.live:
                    logger.warning("idle-poll listener lost its connection (%s); reconnecting", exc)
                self.cache.down()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _close(self) -> None:
        if self.listener is not None:
            self.listener.cancel()
            try:
                await self.listener
            except BaseException:  # noqa: BLE001, S110 (it was cancelled; how it ended does not matter)
                pass
            self.listener = None
        await self.db.close()
