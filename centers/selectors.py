from django.db.models import QuerySet

from centers.models import AgentHeartbeat, ApiKey, Center
from centers.services import key_digest


def apikey_get_active(*, secret: str) -> ApiKey | None:
    """The live key matching a presented secret, with its center, or None."""
    if not secret:
        return None
    return (
        ApiKey.objects.select_related("center__city__region")
        .filter(digest=key_digest(secret), revoked_at__isnull=True, center__is_active=True)
        .first()
    )


def agent_heartbeats_of_center(*, center: Center) -> QuerySet[AgentHeartbeat]:
    return AgentHeartbeat.objects.filter(center=center).order_by("hostname")
