"""The API's rate limit: each center key has its own budget, so one flooding center
is answered 429 while the others go on."""

from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle

from centers.auth import CenterAgent


class CenterKeyRateThrottle(SimpleRateThrottle):
    """REST framework's sliding window, counted per API key in the default cache.

    A 429 carries Retry-After (REST framework sets it from the window) and the
    API's usual {"error": ...} body (portal.api.exception_handler).
    """

    scope = "center-key"

    def get_rate(self) -> str | None:
        # From settings.API_RATE_LIMIT, read when the request comes, not REST framework's import-time copy.
        return settings.API_RATE_LIMIT or None

    def get_cache_key(self, request, view) -> str | None:
        if not isinstance(request.user, CenterAgent):
            return None  # no key, nothing to count against: authentication answers instead
        # The digest, not the row id: ids are reused where a database rolls back (SQLite in tests).
        return self.cache_format % {"scope": self.scope, "ident": request.user.api_key.digest}
