"""HTTP plumbing shared by send and receive: the authenticated client and retries."""

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

import httpx

from agent import __version__
from agent.config import ConfigError, Settings

log = logging.getLogger(__name__)

RETRY_ATTEMPTS = 5
RETRY_BASE_SECONDS = 0.5
RETRY_CAP_SECONDS = 8.0
# A 429 without a usable Retry-After waits this long; a Retry-After beyond the cap is read as
# a mistake, since an unattended agent must not go quiet for days on one header.
RATE_LIMIT_DEFAULT_SECONDS = 5.0
RATE_LIMIT_CAP_SECONDS = 3600.0

T = TypeVar("T")


class RetryableStatus(Exception):
    """The portal answered "not now" (429 or 5xx); the request may succeed later."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code} {response.reason_phrase}")
        self.status_code = response.status_code


class RateLimited(RetryableStatus):
    """HTTP 429: this key sent too much; the portal says how long to wait (Retry-After)."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response)
        self.retry_after = retry_after_seconds(response.headers.get("Retry-After"))


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if value is None or not value.strip():
        return RATE_LIMIT_DEFAULT_SECONDS
    text = value.strip()
    if text.isdigit():
        seconds = float(text)
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return RATE_LIMIT_DEFAULT_SECONDS
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), RATE_LIMIT_CAP_SECONDS)


def make_client(settings: Settings, connections: int) -> httpx.Client:
    """One client per run, shared by all threads, so connections are kept alive and reused."""
    # A private CA replaces the public roots; verification itself is never switched off.
    verify: ssl.SSLContext | bool = True
    if settings.ca_bundle:
        try:
            verify = ssl.create_default_context(cafile=str(settings.ca_bundle))
        except ssl.SSLError as exc:
            raise ConfigError(f"CA bundle {settings.ca_bundle} is not usable: {exc}") from exc
    return httpx.Client(
        base_url=settings.server,
        headers={"Authorization": f"Bearer {settings.key}", "User-Agent": f"exchange-agent/{__version__}"},
        verify=verify,
        # Generous read timeout: the portal hashes and stores an upload before it answers.
        timeout=httpx.Timeout(30.0, read=120.0),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


def check_retryable(response: httpx.Response) -> httpx.Response:
    """Return `response`, or raise RateLimited (429) or RetryableStatus (5xx) when it asks to try again later."""
    if response.status_code == 429:
        response.close()
        raise RateLimited(response)
    if response.status_code >= 500:
        response.close()
        raise RetryableStatus(response)
    return response


def backoff_delay(attempt: int, base: float = RETRY_BASE_SECONDS, cap: float = RETRY_CAP_SECONDS) -> float:
    """Seconds to wait before retry number `attempt` (0 = first retry)."""
    # Jitter keeps many agents from hitting a portal that just came back all at once.
    return random.uniform(0.5, 1.0) * min(cap, base * 2**attempt)


def with_retries(
    operation: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS, stop: threading.Event | None = None
) -> T:
    """Run `operation`, retrying network errors and RetryableStatus; the last failure propagates.

    A 429 is not a failure of the request: it waits the portal's Retry-After and does not
    count as an attempt, for as long as the portal keeps asking. `stop` cuts a wait short
    (the agent is shutting down); the last failure then propagates.
    """
    attempt = 0
    while True:
        try:
            return operation()
        except RateLimited as exc:
            log.warning("%s: the portal asks this agent to slow down; waiting %.1f s (HTTP 429)", what, exc.retry_after)
            if not _pause(exc.retry_after, stop):
                raise
        except (httpx.TransportError, RetryableStatus) as exc:
            attempt += 1
            if attempt >= attempts:
                raise
            delay = backoff_delay(attempt - 1)
            log.warning("%s: %s; retry %d/%d in %.1f s", what, describe(exc), attempt, attempts - 1, delay)
            if not _pause(delay, stop):
                raise


def _pause(seconds: float, stop: threading.Event | None) -> bool:
    """Sleep `seconds`; False when `stop` was set meanwhile (or already)."""
    if stop is None:
        time.sleep(seconds)
        return True
    return not stop.wait(seconds)


def describe(exc: BaseException) -> str:
    """A short reason for a log line; several httpx errors have an empty message."""
    return str(exc) or type(exc).__name__


def error_reason(response: httpx.Response) -> str:
    """The portal's own "error" sentence when it gave one, else the status line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = body.get("error") if isinstance(body, dict) else None
    status = f"HTTP {response.status_code}"
    return f"{status}: {message}" if message else f"{status} {response.reason_phrase}"
