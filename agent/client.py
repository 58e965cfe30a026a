"""HTTP plumbing shared by send and receive: the authenticated client and retries."""

import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import TypeVar

import httpx

from agent import __version__
from agent.config import ConfigError, Settings

log = logging.getLogger(__name__)

RETRY_ATTEMPTS = 5
RETRY_BASE_SECONDS = 0.5
RETRY_CAP_SECONDS = 8.0

T = TypeVar("T")


class RetryableStatus(Exception):
    """The portal answered "not now" (429 or 5xx); the request may succeed later."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code} {response.reason_phrase}")
        self.status_code = response.status_code


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
    """Return `response`, or raise RetryableStatus when it asks to try again later."""
    if response.status_code == 429 or response.status_code >= 500:
        response.close()
        raise RetryableStatus(response)
    return response


def backoff_delay(attempt: int, base: float = RETRY_BASE_SECONDS, cap: float = RETRY_CAP_SECONDS) -> float:
    """Seconds to wait before retry number `attempt` (0 = first retry)."""
    # Jitter keeps many agents from hitting a portal that just came back all at once.
    return random.uniform(0.5, 1.0) * min(cap, base * 2**attempt)


def with_retries(operation: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS) -> T:
    """Run `operation`, retrying network errors and RetryableStatus; the last failure propagates."""
    attempt = 0
    while True:
        try:
            return operation()
        except (httpx.TransportError, RetryableStatus) as exc:
            attempt += 1
            if attempt >= attempts:
                raise
            delay = backoff_delay(attempt - 1)
            log.warning("%s: %s; retry %d/%d in %.1f s", what, describe(exc), attempt, attempts - 1, delay)
            time.sleep(delay)


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
