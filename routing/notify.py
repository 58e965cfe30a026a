"""Tells every web worker's idle-poll cache (routing.idle_poll) that an answer it may hold is stale.

Each uvicorn worker's fast path LISTENs on one PostgreSQL channel and keeps, for
a short while, which keys are live and which centers have nothing to lease.
The writes that change those answers call these functions inside their own
transaction: `pg_notify` is delivered when (and only if) the transaction
commits. On SQLite there is no fast path and no listener, and they do nothing.

A missed notification costs at most the cache's lifetime
(`routing.idle_poll.CACHE_SECONDS`): the cache never trusts an answer longer.
"""

from collections.abc import Iterable

from django.db import connections
from django.db.models.signals import post_delete, post_save

CHANNEL = "dx_idle_poll"
QUEUED = "d"  # deliveries became available to lease for these centers
KEYS = "k"  # a key of these centers was revoked or changed, or a center's rights changed
# PostgreSQL refuses payloads of 8,000 bytes or more.
_PAYLOAD_LIMIT = 7_900


def deliveries_queued(center_ids: Iterable[int], *, using: str = "default") -> None:
    """Deliveries of these centers were queued (or queued again): their "nothing to lease" answers are stale."""
    _notify(QUEUED, center_ids, using)


def center_access_changed(center_ids: Iterable[int], *, using: str = "default") -> None:
    """A key of these centers was revoked or edited, or a center's active or may-subscribe flag changed."""
    _notify(KEYS, center_ids, using)


def payloads(kind: str, center_ids: Iterable[int]) -> list[str]:
    """`kind:1,2,3` messages, each under PostgreSQL's payload limit."""
    messages, current = [], []
    size = len(kind) + 1
    for center_id in sorted({int(c) for c in center_ids}):
        text = str(center_id)
        if current and size + len(text) + 1 > _PAYLOAD_LIMIT:
            messages.append(f"{kind}:{','.join(current)}")
            current, size = [], len(kind) + 1
        current.append(text)
        size += len(text) + 1
    if current:
        messages.append(f"{kind}:{','.join(current)}")
    return messages


def parse(payload: str) -> tuple[str, set[int] | None]:
    """(kind, center ids) of a message; None for the ids when it cannot be read (drop everything)."""
    kind, _, ids = payload.partition(":")
    try:
        return kind, {int(part) for part in ids.split(",") if part}
    except ValueError:
        return kind, None


def _notify(kind: str, center_ids: Iterable[int], using: str) -> None:
    connection = connections[using]
    if connection.vendor != "postgresql":
        return
    messages = payloads(kind, center_ids)
    if not messages:
        return
    with connection.cursor() as cursor:
        for message in messages:
            cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, message])


def _center_saved(sender, instance, using, **kwargs) -> None:
    center_access_changed([instance.pk], using=using)


def _key_changed(sender, instance, using, **kwargs) -> None:
    center_access_changed([instance.center_id], using=using)


def connect_signals() -> None:
    """Admin edits and `load_network` save centers and keys one by one; each save tells the caches."""
    from centers.models import ApiKey, Center

    post_save.connect(_center_saved, sender=Center, dispatch_uid="routing.notify.center_saved")
    post_delete.connect(_center_saved, sender=Center, dispatch_uid="routing.notify.center_deleted")
    post_save.connect(_key_changed, sender=ApiKey, dispatch_uid="routing.notify.key_saved")
    post_delete.connect(_key_changed, sender=ApiKey, dispatch_uid="routing.notify.key_deleted")
