"""The API's rate limit in REST framework: each center key has its own budget, so one
flooding center is answered 429 while the others go on.

Behind uvicorn (portal.asgi) the bridge has already counted the request on the event
loop, before its body was read (portal.bridge); this throttle counts only what no
bridge has (the test client, a plain WSGI server), in the same counters.
"""

import functools

from django.conf import settings
from rest_framework.throttling import BaseThrottle

from centers.auth import CenterAgent
from centers.ratelimit import MemoryCounter, RedisCounter, counter_for, parse_rate
from portal.bridge import RATE_COUNTED


@functools.cache
def key_counter() -> MemoryCounter | RedisCounter:
    """This process's counters, shared with the bridge: Redis when CACHE_URL is redis://."""
    return counter_for(settings.CACHES["default"])


class CenterKeyRateThrottle(BaseThrottle):
    """A window per API key digest (centers.ratelimit), settings.API_RATE_LIMIT requests long.

    A 429 carries Retry-After (REST framework sets it from wait()) and the API's usual
    {"error": ...} body (portal.api.exception_handler).
    """

    def allow_request(self, request, view) -> bool:
        self.retry_after = None
        # Read when the request comes, so a changed setting applies at once.
        rate = parse_rate(settings.API_RATE_LIMIT)
        if rate is None or request.META.get(RATE_COUNTED) or not isinstance(request.user, CenterAgent):
            return True  # no limit, counted by the bridge, or no key: authentication answers instead
        verdict = key_counter().hit(request.user.api_key.digest, rate)
        self.retry_after = verdict.retry_after
        return verdict.allowed

    def wait(self) -> float | None:
        return self.retry_after
