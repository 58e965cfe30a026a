"""Backfill on request: queue for one center what was published before it subscribed.

A new or widened subscription receives only what is published from then on; an
administrator who wants the past for a center asks for it here (the `backfill`
command, or the admin action on subscriptions). The rows are written by the same
fan-out as live traffic (routing.fanout.fanouts_write, a batch at a time, at routine
priority), so its rules hold:
never to the publisher, one delivery per center, de-identified copies for a
de-identifying center, a whole-study flag for `deliver: study`.
"""

import logging
import time
from dataclasses import dataclass
from datetime import date, datetime

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from centers.models import Center
from centers.services import audit_record
from routing.fanout import FanoutGroup, fanouts_write
from routing.models import DeidentifiedCopy, Delivery, Instance, Priority, Subscription
from routing.patterns import (
    DEIDENTIFY_LEVELS,
    DELIVER_LEVELS,
    Match,
    SubscriptionRef,
    pattern_validate,
    recipient_options,
    route,
    topic_matches,
)

logger = logging.getLogger(__name__)

# Between two batches the writer lets go for a moment: on SQLite one writer at a
# time holds the whole database, and live uploads, fan-outs and acks wait behind it.
PAUSE_SECONDS = 0.05


class BackfillRefused(ValueError):
    """A backfill that must not run, with the sentence that says why."""


def backfill_check(*, center: Center, pattern: str | None = None) -> None:
    """Raise BackfillRefused (or InvalidPattern) unless a backfill for this center may run."""
    if not center.is_active:
        raise BackfillRefused(f"Center {center.slug} is inactive: it receives nothing, backfilled or live.")
    if not center.may_subscribe:
        raise BackfillRefused(f"Center {center.slug} may not subscribe: it receives nothing, backfilled or live.")
    if pattern is not None:
        pattern_validate(pattern)


def deliveries_backfill(
    *,
    center: Center,
    since: date,
    pattern: str | None = None,
    user=None,
    batch: int = 500,
    pause: float = PAUSE_SECONDS,
) -> int:
    """Queue the center's deliveries of the original instances received since `since` (midnight, local time)
    that match its active subscriptions, or `pattern` when given. Returns how many were queued.

    Each batch of `batch` instances is one short transaction (backfill_batch). With `pattern`, an
    instance none of the center's subscriptions matches gets the strictest options among them, so
    a backfill never hands identified images to a center that receives de-identified ones.
    Idempotent: what the center already has (a delivery, or a copy made or to make) is skipped.
    One audit row per run, written even when the run stops half-way, says what was asked and how
    many were queued.
    """
    keys = backfill_keys(center=center, since=since, pattern=pattern)
    queued = batches = 0
    completed = False
    try:
        after: int | None = 0
        while after is not None:
            if batches and pause:
                time.sleep(pause)
            done = backfill_batch(center=center, since=since, keys=keys, pattern=pattern, after=after, batch=batch)
            queued += done.queued
            batches += 1
            after = done.last_pk
        completed = True
    finally:
        backfill_audit(
            center=center, since=since, pattern=pattern, user=user, queued=queued, batches=batches, completed=completed
        )
    return queued


@dataclass(frozen=True)
class BatchDone:
    queued: int
    # Where the next batch starts; None when nothing is left.
    last_pk: int | None


def backfill_keys(*, center: Center, since: date, pattern: str | None = None) -> list[str]:
    """Check that the backfill may run, and list the routing keys it covers (few: region.city.modality)."""
    backfill_check(center=center, pattern=pattern)
    keys = _candidates(center=center, since=since).values_list("routing_key", flat=True).distinct().order_by()
    return sorted(_matches_by_key(keys=keys, center=center, refs=_refs(center), pattern=pattern))


def backfill_batch(
    *, center: Center, since: date, keys: list[str], pattern: str | None = None, after: int = 0, batch: int = 500
) -> BatchDone:
    """One transaction: the fan-out to the center of up to `batch` instances past primary key `after`."""
    with transaction.atomic():
        # A long run re-reads the center each batch: one deactivated meanwhile gets nothing more.
        center.refresh_from_db(fields=["is_active", "may_subscribe"])
        backfill_check(center=center)
        instances = list(
            _candidates(center=center, since=since).filter(routing_key__in=keys, pk__gt=after).order_by("pk")[:batch]
        )
        matching = _matches_by_key(
            keys={i.routing_key for i in instances}, center=center, refs=_refs(center), pattern=pattern
        )
        groups: dict[str, FanoutGroup] = {}
        for instance in instances:
            matches = matching.get(instance.routing_key)
            if not matches:
                continue  # its subscription was deactivated since the run began
            if instance.routing_key not in groups:
                options = recipient_options(matches)
                groups[instance.routing_key] = FanoutGroup(matches=matches, options=options, priority=Priority.ROUTINE)
            groups[instance.routing_key].instances.append(instance)
        written = fanouts_write(groups=list(groups.values()), origin=Delivery.Origin.BACKFILL, mark_routed=False)
        queued = sum(len(fanout.delivery_centers) + len(fanout.copy_ids) for fanout in written.values())
    return BatchDone(queued=queued, last_pk=instances[-1].pk if len(instances) == batch else None)


def backfill_audit(
    *, center: Center, since: date, pattern: str | None, user, queued: int, batches: int, completed: bool
) -> None:
    audit_record(
        action="delivery.backfill",
        center=center,
        user=user,
        obj=center,
        detail={
            "since": since.isoformat(),
            "pattern": pattern or "",
            "queued": queued,
            "batches": batches,
            "completed": completed,
        },
    )
    logger.info("backfill for %s since %s (%s): %d queued", center.slug, since, pattern or "subscriptions", queued)


def _refs(center: Center) -> list[SubscriptionRef]:
    return [
        SubscriptionRef(subscription_id=pk, center_id=center.pk, pattern=p, deidentify=d, deliver=w)
        for pk, p, d, w in Subscription.objects.filter(center=center, is_active=True).values_list(
            "pk", "pattern", "deidentify", "deliver"
        )
    ]


def _candidates(*, center: Center, since: date) -> QuerySet[Instance]:
    """Originals received since local midnight of `since`, published by another center, that this center
    has nothing of yet."""
    start = timezone.make_aware(datetime.combine(since, datetime.min.time()))
    return (
        Instance.objects.filter(derived_from__isnull=True, received_at__gte=start)
        .exclude(source_center=center)
        .exclude(pk__in=Delivery.objects.filter(center=center).values("instance_id"))
        .exclude(pk__in=DeidentifiedCopy.objects.filter(center=center).values("original_id"))
    )


def _matches_by_key(
    *, keys, center: Center, refs: list[SubscriptionRef], pattern: str | None
) -> dict[str, list[Match]]:
    """The routing keys the backfill covers, each with the matches its fan-out records."""
    # Few distinct keys (region.city.modality) stand for many instances: match each key once.
    strictest = _strictest(center=center, refs=refs)
    found: dict[str, list[Match]] = {}
    for key in keys:
        matches = route(key, refs)
        if pattern is None:
            if matches:
                found[key] = matches
        elif topic_matches(pattern, key):
            found[key] = matches or [
                Match(
                    subscription_id=None,
                    center_id=center.pk,
                    pattern=pattern,
                    key=key,
                    deidentify=strictest.deidentify,
                    deliver=strictest.deliver,
                )
            ]
    return found


def _strictest(*, center: Center, refs: list[SubscriptionRef]) -> SubscriptionRef:
    deidentify = max((r.deidentify for r in refs), key=DEIDENTIFY_LEVELS.index, default=DEIDENTIFY_LEVELS[0])
    deliver = max((r.deliver for r in refs), key=DELIVER_LEVELS.index, default=DELIVER_LEVELS[0])
    return SubscriptionRef(subscription_id=0, center_id=center.pk, pattern="", deidentify=deidentify, deliver=deliver)
