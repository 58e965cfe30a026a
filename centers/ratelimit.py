"""The per-key request budget (API_RATE_LIMIT), counted where it is cheapest.

A key's requests are counted by the key's SHA-256 digest, the identity ApiKey
stores, so counting needs no database: whatever a caller presents as a Bearer
token is counted, known key or not. Each identity gets a window that opens at
its first request and lasts the rate's period; the count of that window is
raised and read in one atomic step, so requests from one key racing each other
can never slip past the limit.

With CACHE_URL=redis://... every web process shares the counters in Redis (a
Lua script: INCR, PEXPIRE on the window's first request, PTTL); a key once
refused is refused by that process until its window ends without asking Redis
again. With any other CACHE_URL each web process counts on its own, so a key
may send the rate to each of them.

portal.bridge checks the budget on the event loop before a request's body is
read; centers.throttling checks it in REST framework for a request no bridge
has counted (the test client, a plain WSGI server).
"""

import asyncio
import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass

import redis
import redis.asyncio

logger = logging.getLogger(__name__)

PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# INCR and its window's expiry in one step: a key created by INCR always gets its PEXPIRE.
WINDOW_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return {count, redis.call('PTTL', KEYS[1])}
"""
REDIS_PREFIX = "dx:rate:"
# A Redis that does not answer within this long lets the request through (logged once).
REDIS_TIMEOUT_SECONDS = 0.5
# Connections to Redis per web process's event loop; one script call takes a fraction of a millisecond.
REDIS_CONNECTIONS = 16
REDIS_POOL_WAIT_SECONDS = 2.0
# Identities kept by a per-process counter before the windows that ended are dropped.
MEMORY_PRUNE_AT = 10_000


@dataclass(frozen=True)
class Rate:
    count: int
    seconds: int


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int  # whole seconds until the window ends, at least 1


def parse_rate(text: str) -> Rate | None:
    """'200/s', '3/m', '1000/h', '5/day' (REST framework's notation); empty for no limit."""
    if not text:
        return None
    count, _, period = text.partition("/")
    try:
        return Rate(count=int(count), seconds=PERIODS[period.strip()[:1]])
    except (ValueError, KeyError):
        raise ValueError(f"API_RATE_LIMIT={text!r}: use <requests>/s, /m, /h or /d, or empty for no limit") from None


def bearer_identity(authorization: str | bytes | None) -> str | None:
    """The digest of a Bearer key (centers.services.key_digest), or None when none is presented."""
    if not authorization:
        return None
    if isinstance(authorization, bytes):
        try:
            authorization = authorization.decode("ascii")
        except UnicodeDecodeError:
            return None
    parts = authorization.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return hashlib.sha256(parts[1].encode()).hexdigest()


def _verdict(rate: Rate, count: int, seconds_left: float) -> Verdict:
    return Verdict(allowed=count <= rate.count, retry_after=max(1, math.ceil(seconds_left)))


class MemoryCounter:
    """Windows kept in this process: exact for one web process, per process for several."""

    def __init__(self) -> None:
        # Taken by the event loop and by Django's threads alike; held for a dict update.
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}

    def hit(self, identity: str, rate: Rate) -> Verdict:
        now = time.monotonic()
        with self._lock:
            opened, count = self._windows.get(identity, (now, 0))
            if now - opened >= rate.seconds:
                opened, count = now, 0
            count += 1
            self._windows[identity] = (opened, count)
            if len(self._windows) > MEMORY_PRUNE_AT:
                # Keys that are made up per request cannot grow the table past one window's worth.
                self._windows = {k: v for k, v in self._windows.items() if now - v[0] < rate.seconds}
        return _verdict(rate, count, opened + rate.seconds - now)

    async def ahit(self, identity: str, rate: Rate) -> Verdict:
        return self.hit(identity, rate)

    def clear(self) -> None:
        with self._lock:
            self._windows.clear()


class RedisCounter:
    """Windows in Redis, shared by every web process; a Redis that fails lets requests through."""

    def __init__(self, url: str) -> None:
        options = {"socket_timeout": REDIS_TIMEOUT_SECONDS, "socket_connect_timeout": REDIS_TIMEOUT_SECONDS}
        self._sync = redis.Redis.from_url(url, **options)
        self._sync_script = self._sync.register_script(WINDOW_SCRIPT)
        self.url, self._options = url, options
        # redis.asyncio's connections belong to the event loop that made them: one client per loop.
        self._async: dict[asyncio.AbstractEventLoop, object] = {}
        self._failing = False
        # Keys refused until their window ends (monotonic time): a flood's further requests
        # are refused from here, without a round trip to Redis each.
        self._refused: dict[str, float] = {}

    def _still_refused(self, identity: str) -> Verdict | None:
        ends = self._refused.get(identity)
        if ends is None:
            return None
        left = ends - time.monotonic()
        if left <= 0:
            self._refused.pop(identity, None)
            return None
        return Verdict(allowed=False, retry_after=max(1, math.ceil(left)))

    def hit(self, identity: str, rate: Rate) -> Verdict:
        if (refused := self._still_refused(identity)) is not None:
            return refused
        try:
            count, ttl_ms = self._sync_script(keys=[REDIS_PREFIX + identity], args=[rate.seconds * 1000])
        except redis.RedisError:
            return self._unavailable()
        return self._counted(identity, rate, count, ttl_ms)

    async def ahit(self, identity: str, rate: Rate) -> Verdict:
        if (refused := self._still_refused(identity)) is not None:
            return refused
        loop = asyncio.get_running_loop()
        script = self._async.get(loop)
        if script is None:
            # A flood's requests wait their turn for a connection instead of failing open.
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self.url, max_connections=REDIS_CONNECTIONS, timeout=REDIS_POOL_WAIT_SECONDS, **self._options
            )
            script = redis.asyncio.Redis(connection_pool=pool).register_script(WINDOW_SCRIPT)
            self._async = {loop: script}
        try:
            count, ttl_ms = await script(keys=[REDIS_PREFIX + identity], args=[rate.seconds * 1000])
        except redis.RedisError:
            return self._unavailable()
        return self._counted(identity, rate, count, ttl_ms)

    def _counted(self, identity: str, rate: Rate, count: int, ttl_ms: int) -> Verdict:
        if self._failing:
            logger.warning("Rate-limit counters in Redis are reachable again (%s)", self.url)
            self._failing = False
        verdict = _verdict(rate, int(count), max(ttl_ms, 0) / 1000)
        if not verdict.allowed:
            now = time.monotonic()
            if len(self._refused) > MEMORY_PRUNE_AT:
                self._refused = {k: ends for k, ends in self._refused.items() if ends > now}
            self._refused[identity] = now + max(ttl_ms, 0) / 1000
        return verdict

    def _unavailable(self) -> Verdict:
        # Availability first: while Redis is down no key is limited, and that is said once.
        if not self._failing:
            logger.warning("Rate-limit counters in Redis are unreachable (%s): not limiting", self.url, exc_info=True)
            self._failing = True
        return Verdict(allowed=True, retry_after=1)


def counter_for(cache: dict) -> MemoryCounter | RedisCounter:
    """Redis when the default cache (CACHE_URL) is Redis, this process's memory otherwise."""
    if cache["BACKEND"] == "django.core.cache.backends.redis.RedisCache":
        return RedisCounter(cache["LOCATION"])
    return MemoryCounter()
