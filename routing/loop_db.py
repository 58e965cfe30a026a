"""What the ASGI fast paths (routing.idle_poll, routing.fast_download) share: a psycopg pool on the event loop
and the request checks Django would make before they answer without it.
"""

import asyncio

from django.conf import settings
from django.http.request import split_domain_port, validate_host

from centers.services import key_digest

# How long a request waits for one of the pool's connections before Django takes it.
POOL_TIMEOUT_SECONDS = 2.0
# Connections per web process; README's sizing advice counts them (and the idle poll's listener).
POOL_MAX_SIZE = 4


class LoopDatabase:
    """The default database, reached from the event loop through a small pool opened on first use."""

    def __init__(self, database: dict) -> None:
        self.database = database
        self.enabled = database["ENGINE"] == "django.db.backends.postgresql"
        self.pool = None
        self.lock = asyncio.Lock()

    def conninfo(self) -> str:
        from psycopg.conninfo import make_conninfo

        db = self.database
        return make_conninfo(
            dbname=db["NAME"],
            user=db.get("USER") or None,
            password=db.get("PASSWORD") or None,
            host=db.get("HOST") or None,
            port=db.get("PORT") or None,
        )

    async def get(self):
        if self.pool is not None:
            return self.pool
        async with self.lock:
            if self.pool is None:
                from psycopg_pool import AsyncConnectionPool

                pool = AsyncConnectionPool(
                    self.conninfo(),
                    min_size=1,
                    max_size=POOL_MAX_SIZE,
                    open=False,
                    kwargs={"autocommit": True},
                    # After a PostgreSQL restart every idle connection is dead: check each loan.
                    check=AsyncConnectionPool.check_connection,
                    # While the database is down, hand the request to Django soon rather than hold it.
                    timeout=POOL_TIMEOUT_SECONDS,
                )
                await pool.open()
                self.pool = pool
        return self.pool

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


class HostCheck:
    """ALLOWED_HOSTS as Django checks it, remembered: a handful of agents send the same Host."""

    def __init__(self) -> None:
        self.known: dict[bytes, bool] = {}

    def __call__(self, host: bytes) -> bool:
        allowed = self.known.get(host)
        if allowed is None:
            domain, _ = split_domain_port(host.decode("latin-1"))
            allowed = bool(domain) and validate_host(domain, settings.ALLOWED_HOSTS)
            if len(self.known) >= 256:
                self.known.clear()
            self.known[host] = allowed
        return allowed


def bearer_digest(authorization: bytes) -> str | None:
    """The stored digest of a `Bearer <key>` header's key, or None for any other header."""
    parts = authorization.split()
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return None
    try:
        return key_digest(parts[1].decode("ascii"))
    except UnicodeDecodeError:
        return None
