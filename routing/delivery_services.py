"""Writes of the delivery queue: what a center may lease, leases, acknowledgements and their failures."""

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from centers.models import ApiKey, Center
from centers.services import audit_events_record, audit_record
from portal.metrics import count_acks, count_leases
from routing import notify
from routing.models import DeidentifiedCopy, Delivery, Instance

logger = logging.getLogger(__name__)


def _available(now) -> Q:
    return _unleased(now) & (Q(whole_study=False) | _study_stable(now))


def _unleased(now) -> Q:
    """Queued, or leased once but the lease ran out: the part of _available a lease changes."""
    expired = Q(status=Delivery.Status.LEASED, lease_expires_at__lt=now)
    if settings.DELIVERY_MAX_LEASES:
        # One leased that often waits for deliveries_expire_leases, which fails it.
        expired &= Q(attempts__lt=settings.DELIVERY_MAX_LEASES)
    return Q(status=Delivery.Status.QUEUED) | expired


def _study_stable(now) -> Q:
    """The delivery's study had no new instance for STUDY_STABLE_SECONDS.

    The study is the delivered instance's: for a de-identified copy, the copy's study,
    whose instances are made as the originals arrive. A copy of the original study still
    to be made holds it back too: however long ago the last copy was made, the copy's
    study is not whole while a worker is behind. Both are sets of studies read once
    (hashed by PostgreSQL), not a subquery per delivery: joins from the delivery to
    its original made the planner walk every instance to answer an idle poll.
    """
    recent = Instance.objects.filter(received_at__gt=now - timedelta(seconds=settings.STUDY_STABLE_SECONDS)).values(
        "series__study_id"
    )
    pending = DeidentifiedCopy.objects.filter(status=DeidentifiedCopy.Status.PENDING)
    # Copy studies of an original study with a copy pending. Matched by study and by center,
    # not by the pair: a rare over-match holds a study only until those copies are made.
    copying = Instance.objects.filter(
        derived_from__series__study_id__in=pending.values("original__series__study_id"),
        derived_for_id__in=pending.values("center_id"),
    ).values("series__study_id")
    return ~Q(instance__series__study_id__in=recent) & ~Q(instance__series__study_id__in=copying)


# A lease that begins a whole study takes the rest of it (up to this many more), so the
# receiving agent can place the study at once; a larger study is split over leases.
WHOLE_STUDY_LEASE_MAX = 2000


def _whole_studies_rest(*, center: Center, now, begun: list[int]) -> list[int]:
    """The other available deliveries of the whole studies among `begun`, locked like them."""
    studies = Delivery.objects.filter(pk__in=begun, whole_study=True).values("instance__series__study_id")
    return list(
        Delivery.objects.select_for_update(skip_locked=True, of=("self",))
        .filter(_available(now), center=center, whole_study=True, instance__series__study_id__in=studies)
        .exclude(pk__in=begun)
        .order_by("pk")
        .values_list("pk", flat=True)[:WHOLE_STUDY_LEASE_MAX]
    )


def _grouped_by_study(leased: list[Delivery]) -> list[Delivery]:
    """The lease's order, with each study's deliveries together where the study first appears."""
    first: dict[int, int] = {}
    for index, delivery in enumerate(leased):
        first.setdefault(delivery.instance.series.study_id, index)
    return sorted(leased, key=lambda d: first[d.instance.series.study_id])


# The lease's order: stat first, then live before backfill ('live' > 'backfill'), then oldest.
# A backfill of thousands queued for a center must not hold back what is published meanwhile.
LEASE_ORDER = ("-priority", "-origin", "pk")


def _first_by_priority(available: QuerySet[Delivery], limit: int) -> tuple[list[int], bool]:
    """The first `limit` of `available` (one center's) in LEASE_ORDER, and whether any is of a whole study.

    Asked once per status: with one status, PostgreSQL walks the index delivery_queue_priority
    (center, status, -priority, -origin, id) in order and stops after `limit` rows, however long
    the backlog; the OR of _available across two statuses made it sort every queued row instead.
    """
    rows = [
        row
        for status in (Delivery.Status.QUEUED, Delivery.Status.LEASED)
        for row in available.filter(status=status)
        .order_by(*LEASE_ORDER)
        .values_list("priority", "origin", "pk", "whole_study")[:limit]
    ]
    rows.sort(key=lambda row: row[2])
    rows.sort(key=lambda row: (row[0], row[1]), reverse=True)
    first = rows[:limit]
    return [row[2] for row in first], any(row[3] for row in first)


@count_leases
def deliveries_lease(
    *, center: Center, limit: int, api_key: ApiKey | None = None, address: str | None = None
) -> list[Delivery]:
    """Lease up to `limit` of a center's queued deliveries to one caller.

    On PostgreSQL, SKIP LOCKED lets concurrent pollers take disjoint rows; the
    conditional UPDATE with a fresh token is what makes each lease exclusive
    on every database.
    """
    now = timezone.now()
    # The common answer to an idle agent's poll: one indexed read, no transaction
    # and no row locks. A delivery queued right after it is found by the next poll.
    if not Delivery.objects.filter(_unleased(now), center=center).exists():
        return []
    token = uuid.uuid4()
    # of self: whole studies' availability joins the instance and series, which stay unlocked.
    lockable = Delivery.objects.select_for_update(skip_locked=True, of=("self",)).filter(center=center)
    with transaction.atomic():
        # Unleased is available unless it waits for its whole study. Only a lease whose first
        # rows include such a delivery asks for the studies' stability: building those
        # subqueries cost 7 of a lease's 17 ms of web CPU, and PostgreSQL ran them three times.
        # (A center with only a study still arriving pays this transaction on each poll.)
        candidates, whole_studies = _first_by_priority(lockable.filter(_unleased(now)), limit)
        if whole_studies:
            candidates, whole_studies = _first_by_priority(lockable.filter(_available(now)), limit)
        if not candidates:
            return []
        if whole_studies:
            # Only a lease that begins a whole study looks for the rest of it: a statement less otherwise.
            candidates += _whole_studies_rest(center=center, now=now, begun=candidates)
        # The candidates were found available in this transaction: what a concurrent lease may
        # have changed since (where rows are not locked) is only whether they are still unleased.
        Delivery.objects.filter(_unleased(now), pk__in=candidates).update(
            status=Delivery.Status.LEASED,
            lease_token=token,
            leased_at=now,
            lease_expires_at=now + timedelta(seconds=settings.DELIVERY_LEASE_SECONDS),
            attempts=F("attempts") + 1,
        )
        leased = list(
            Delivery.objects.filter(lease_token=token)
            .select_related("instance__series__study__patient")
            .order_by(*LEASE_ORDER)
        )
        leased = _grouped_by_study(leased)
        if leased:
            audit_record(
                action="delivery.lease",
                center=center,
                api_key=api_key,
                object_type="delivery",
                object_id=",".join(str(d.pk) for d in leased)[:128],
                address=address,
                detail={"deliveries": [d.pk for d in leased]},
            )
    return leased


class ChecksumMismatch(Exception):
    pass


def delivery_ack(*, delivery: Delivery, sha256: str, api_key: ApiKey | None = None, address: str | None = None) -> None:
    """Mark a delivery done, or queue it again or fail it (ChecksumMismatch) when the receiver got other bytes."""
    [outcome] = deliveries_ack(center=delivery.center, acks=[(delivery.pk, sha256)], api_key=api_key, address=address)
    if outcome.status in ("requeued", "failed"):
        raise ChecksumMismatch(outcome.error)


@dataclass(frozen=True)
class AckOutcome:
    delivery_id: int
    status: str  # "delivered", "requeued" (checksum mismatch), "failed" (too many of them) or "not_found"
    error: str = ""


@count_acks
def deliveries_ack(
    *, center: Center, acks: list[tuple[int, str]], api_key: ApiKey | None = None, address: str | None = None
) -> list[AckOutcome]:
    """Acknowledge a center's deliveries in one transaction: each one delivered, or queued
    again when the receiver reported other bytes, or failed for good once it reported
    other bytes `DELIVERY_MAX_MISMATCHES` times; another center's id is "not_found".

    An agent acks a whole lease at once: one request and a few statements
    instead of a request and a transaction per file.
    """
    now = timezone.now()
    wanted = dict(acks)
    rows = list(Delivery.objects.filter(center=center, pk__in=wanted).values_list("pk", "instance__sha256", "status"))
    found = {pk: sha256 for pk, sha256, _ in rows}
    failed = [pk for pk, _, status in rows if status == Delivery.Status.FAILED]
    delivered = [pk for pk in wanted if pk in found and wanted[pk].lower() == found[pk]]
    mismatched = [pk for pk in wanted if pk in found and wanted[pk].lower() != found[pk]]
    newly_failed: list[int] = []
    with transaction.atomic():
        undelivered = Delivery.objects.filter(pk__in=delivered).exclude(status=Delivery.Status.DELIVERED)
        changed = list(undelivered.values_list("pk", flat=True))
        Delivery.objects.filter(pk__in=changed).update(
            status=Delivery.Status.DELIVERED,
            delivered_at=now,
            lease_token=None,
            lease_expires_at=None,
            last_error="",
            failed_at=None,
        )
        if mismatched:
            newly_failed = _deliveries_mismatch(mismatched=mismatched, wanted=wanted, now=now)
        audit_events_record(
            [
                dict(action="delivery.ack", center=center, api_key=api_key, object_type="delivery", object_id=str(pk))
                for pk in changed
            ]
            + [
                dict(
                    action="delivery.ack_mismatch",
                    center=center,
                    api_key=api_key,
                    object_type="delivery",
                    object_id=str(pk),
                    detail={"reported_sha256": wanted[pk][:64]},
                )
                for pk in mismatched
            ]
            + [
                dict(
                    action="delivery.fail",
                    center=center,
                    api_key=api_key,
                    object_type="delivery",
                    object_id=str(pk),
                    detail={"reason": MISMATCH_REASON},
                )
                for pk in newly_failed
            ],
            address=address,
        )
        if len(newly_failed) < len(mismatched):
            notify.deliveries_queued([center.pk])
    if newly_failed:
        logger.warning("%d delivery(ies) of center %s failed: %s", len(newly_failed), center.pk, MISMATCH_REASON)
    # An ack with the right bytes still delivers a failed delivery; a wrong one leaves it failed.
    failed = {pk for pk in failed if pk in mismatched} | set(newly_failed)
    outcomes = []
    for pk, _ in acks:
        if pk not in found:
            outcomes.append(AckOutcome(pk, "not_found", "No such delivery."))
        elif pk in failed:
            outcomes.append(
                AckOutcome(
                    pk,
                    "failed",
                    f"The SHA-256 you computed does not match the stored instance ({found[pk]}), and the "
                    "delivery has failed: it is not offered again until an administrator retries it.",
                )
            )
        elif pk in mismatched:
            outcomes.append(
                AckOutcome(
                    pk,
                    "requeued",
                    f"The SHA-256 you computed does not match the stored instance ({found[pk]}); "
                    "the delivery is queued again.",
                )
            )
        else:
            outcomes.append(AckOutcome(pk, "delivered"))
    return outcomes


MISMATCH_REASON = "the receiver's copy never matched the stored SHA-256"
MISSING_FILE_REASON = "the stored file is missing"
EXPIRED_REASON = "leased again and again but never acknowledged"


def _deliveries_mismatch(*, mismatched: list[int], wanted: dict[int, str], now) -> list[int]:
    """Count a mismatch on each; queue again those under the limit, fail the rest. Returns the failed ones."""
    pending = Delivery.objects.filter(pk__in=mismatched).exclude(
        status__in=[Delivery.Status.DELIVERED, Delivery.Status.FAILED]
    )
    limit = settings.DELIVERY_MAX_MISMATCHES
    failed = list(
        pending.select_for_update().filter(mismatches__gte=limit - 1).order_by("pk").values_list("pk", flat=True)
    )
    Delivery.objects.filter(pk__in=failed).update(
        status=Delivery.Status.FAILED,
        mismatches=F("mismatches") + 1,
        lease_token=None,
        lease_expires_at=None,
        failed_at=now,
        last_error=f"{MISMATCH_REASON} ({limit} attempts)",
    )
    for pk in mismatched:
        pending.filter(pk=pk).exclude(pk__in=failed).update(
            status=Delivery.Status.QUEUED,
            mismatches=F("mismatches") + 1,
            lease_token=None,
            lease_expires_at=None,
            last_error=f"checksum mismatch at {now:%Y-%m-%d %H:%M:%S}: receiver reported {wanted[pk][:64]}",
        )
    return failed


def delivery_fail(
    *, delivery: Delivery, reason: str, api_key: ApiKey | None = None, address: str | None = None
) -> bool:
    """Give up on a delivery that cannot succeed (its stored file is gone): failed, audited, never leased again."""
    with transaction.atomic():
        changed = (
            Delivery.objects.filter(pk=delivery.pk)
            .exclude(status__in=[Delivery.Status.DELIVERED, Delivery.Status.FAILED])
            .update(
                status=Delivery.Status.FAILED,
                lease_token=None,
                lease_expires_at=None,
                failed_at=timezone.now(),
                last_error=reason,
            )
        )
        if changed:
            audit_record(
                action="delivery.fail",
                center=delivery.center,
                api_key=api_key,
                obj=delivery,
                address=address,
                detail={"reason": reason},
            )
    if changed:
        logger.error("delivery %s failed: %s (%s)", delivery.pk, reason, delivery.instance.file)
    return bool(changed)


def deliveries_retry(*, deliveries: QuerySet[Delivery], user=None) -> int:
    """Queue failed deliveries again with a fresh count of attempts, each audited."""
    with transaction.atomic():
        retried = list(
            Delivery.objects.filter(pk__in=deliveries.values("pk"), status=Delivery.Status.FAILED)
            .select_related("center")
            .select_for_update(of=("self",))
        )
        Delivery.objects.filter(pk__in=[d.pk for d in retried]).update(
            status=Delivery.Status.QUEUED, attempts=0, mismatches=0, failed_at=None, last_error=""
        )
        for delivery in retried:
            audit_record(
                action="delivery.retry",
                center=delivery.center,
                user=user,
                obj=delivery,
                detail={"was": delivery.last_error},
            )
        notify.deliveries_queued({d.center_id for d in retried})
    return len(retried)


def deliveries_expire_leases() -> int:
    """Queue again what was leased and never acknowledged in time; fail what was leased
    `DELIVERY_MAX_LEASES` times without an acknowledgement (0: never)."""
    now = timezone.now()
    expiring = Delivery.objects.filter(status=Delivery.Status.LEASED, lease_expires_at__lt=now)
    limit = settings.DELIVERY_MAX_LEASES
    with transaction.atomic():
        rows = list(expiring.select_for_update(skip_locked=True).values_list("pk", "center_id", "attempts"))
        to_fail = [(pk, center_id) for pk, center_id, attempts in rows if limit and attempts >= limit]
        to_queue = [(pk, center_id) for pk, center_id, attempts in rows if not (limit and attempts >= limit)]
        Delivery.objects.filter(pk__in=[pk for pk, _ in to_queue]).update(
            status=Delivery.Status.QUEUED, lease_token=None, lease_expires_at=None, last_error="lease expired"
        )
        Delivery.objects.filter(pk__in=[pk for pk, _ in to_fail]).update(
            status=Delivery.Status.FAILED,
            lease_token=None,
            lease_expires_at=None,
            failed_at=now,
            last_error=f"{EXPIRED_REASON} ({limit} leases)",
        )
        centers = {center_id: Center(pk=center_id) for _, center_id, _ in rows}
        audit_events_record(
            [
                dict(action="delivery.expire", center=centers[c], object_type="delivery", object_id=str(pk))
                for pk, c in to_queue
            ]
            + [
                dict(
                    action="delivery.fail",
                    center=centers[c],
                    object_type="delivery",
                    object_id=str(pk),
                    detail={"reason": EXPIRED_REASON},
                )
                for pk, c in to_fail
            ]
        )
        notify.deliveries_queued({c for _, c in to_queue})
    if to_queue:
        logger.warning("%d delivery lease(s) expired and were queued again", len(to_queue))
    if to_fail:
        logger.error("%d delivery(ies) failed: %s %d times", len(to_fail), EXPIRED_REASON, limit)
    return len(to_queue)
