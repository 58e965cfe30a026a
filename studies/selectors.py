"""Reads for the clinician pages, always scoped to one center.

A center sees a study because it published it or because at least one of its
instances was routed to the center; within a study it sees only those instances.
Lists are built with a fixed number of queries per page, whatever its length.
"""

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from django.conf import settings
from django.db.models import Count, F, Max, Min, Q, QuerySet, Sum
from django.db.models.functions import TruncDay, TruncHour
from django.utils import timezone

from centers.models import AgentHeartbeat, ApiKey, Center
from centers.selectors import agent_heartbeats_of_center
from routing.models import DeidentifiedCopy, Delivery, Instance, Priority, Series, Study

# A study whose last instance came in this recently may still be arriving.
SETTLE = timedelta(seconds=getattr(settings, "STUDY_SETTLE_SECONDS", 120))

RECEIVED_SORTS = {
    "received": "received_at",
    "date": "study_date",
    "patient": "patient__name",
    "patient_id": "patient__patient_id",
    "source": "source_center__name",
    "instances": "instance_count",
}


@dataclass(frozen=True)
class StudyFilters:
    query: str = ""
    date_from: date | None = None
    date_to: date | None = None
    modality: str = ""
    source_center_id: int | None = None
    sort: str = "-received"


def _search(query: str) -> Q:
    # DICOM names are stored as Family^Given: "doe jane" should find "Doe^Jane".
    query = query.strip()
    as_name = "^".join(query.split())
    return (
        Q(patient__patient_id__iexact=query)
        | Q(patient__patient_id__istartswith=query)
        | Q(patient__name__icontains=query)
        | Q(patient__name__icontains=as_name)
    )


def _ordering(sort: str) -> list[str]:
    descending = sort.startswith("-")
    column = RECEIVED_SORTS.get(sort.lstrip("-"), "received_at")
    return [f"{'-' if descending else ''}{column}", "-pk"]


def studies_received(*, center: Center, filters: StudyFilters) -> QuerySet[Study]:
    """Studies with at least one instance routed to the center, one row each, with its counts."""
    # The annotations reuse the filter's join, so they count only this center's instances.
    qs = Study.objects.filter(series__instances__deliveries__center=center)
    if filters.modality:
        qs = qs.filter(
            pk__in=Series.objects.filter(
                modality__iexact=filters.modality, instances__deliveries__center=center
            ).values("study_id")
        )
    if filters.query:
        qs = qs.filter(_search(filters.query))
    if filters.date_from:
        qs = qs.filter(study_date__gte=filters.date_from)
    if filters.date_to:
        qs = qs.filter(study_date__lte=filters.date_to)
    if filters.source_center_id:
        qs = qs.filter(source_center_id=filters.source_center_id)
    return (
        qs.annotate(
            series_count=Count("series", distinct=True),
            instance_count=Count("series__instances", distinct=True),
            received_at=Max("series__instances__deliveries__created_at"),
        )
        .select_related("patient", "source_center")
        .order_by(*_ordering(filters.sort))
    )


def studies_sent(*, center: Center, filters: StudyFilters) -> QuerySet[Study]:
    """Studies the center published, newest upload first (not the copies de-identified for recipients)."""
    qs = Study.objects.filter(source_center=center, derived_for__isnull=True)
    if filters.query:
        qs = qs.filter(_search(filters.query))
    if filters.date_from:
        qs = qs.filter(study_date__gte=filters.date_from)
    if filters.date_to:
        qs = qs.filter(study_date__lte=filters.date_to)
    if filters.modality:
        qs = qs.filter(series__modality__iexact=filters.modality).distinct()
    return (
        qs.annotate(
            series_count=Count("series", distinct=True),
            instance_count=Count("series__instances", distinct=True),
            received_at=Max("series__instances__received_at"),
        )
        .select_related("patient")
        .order_by(*_ordering(filters.sort))
    )


def study_modalities(*, study_ids: list[int], center: Center | None = None) -> dict[int, list[str]]:
    """The modalities of each study's series (only those routed to `center`, when given): one query."""
    qs = Series.objects.filter(study_id__in=study_ids)
    if center is not None:
        qs = qs.filter(instances__deliveries__center=center)
    found: dict[int, set[str]] = {}
    for study_id, modality in qs.values_list("study_id", "modality").distinct():
        found.setdefault(study_id, set()).add(modality)
    return {study_id: sorted(modalities) for study_id, modalities in found.items()}


def is_arriving(received_at: datetime | None) -> bool:
    return received_at is not None and timezone.now() - received_at < SETTLE


@dataclass
class RecipientStatus:
    center_name: str
    queued: int = 0
    in_flight: int = 0
    delivered: int = 0
    failed: int = 0
    failed_attempts: int = 0
    first_queued_at: datetime | None = None
    last_delivered_at: datetime | None = None
    # (reason, how many) of the failed ones.
    failure_reasons: list[tuple[str, int]] = field(default_factory=list)
    # Of the deliveries: how many the publisher marked stat, and how many a backfill queued.
    stat: int = 0
    backfill: int = 0
    # De-identified copies for this center: not sent at all (burned-in annotation), with the reasons;
    # still to be made; failed to be made.
    held: int = 0
    held_reasons: list[tuple[str, int]] = field(default_factory=list)
    deidentifying: int = 0
    copy_failed: int = 0

    @property
    def total(self) -> int:
        return self.queued + self.in_flight + self.delivered + self.failed

    @property
    def state(self) -> str:
        if not self.total and self.held:
            return "held"
        if not self.total:
            return "queued"
        if self.delivered == self.total:
            return "delivered"
        if self.failed:
            return "failed"
        if self.failed_attempts:
            return "failing"
        return "in flight" if self.in_flight else "queued"


def _published_deliveries(study_ids: list[int]) -> list[QuerySet[Delivery]]:
    """Deliveries of these published studies' instances, and of the copies de-identified from them,
    each with `study_id` the published study's. Two querysets: one OR across both joins would
    keep the planner from starting at the studies' series and make it scan every delivery."""
    return [
        Delivery.objects.filter(instance__series__study_id__in=study_ids).annotate(
            study_id=F("instance__series__study_id")
        ),
        Delivery.objects.filter(instance__derived_from__series__study_id__in=study_ids).annotate(
            study_id=F("instance__derived_from__series__study_id")
        ),
    ]


def recipients_by_study(*, study_ids: list[int]) -> dict[int, list[RecipientStatus]]:
    """Per study and receiving center: how many instances are queued, in flight, delivered or failed
    (and why), and when; how many of them are stat or backfilled; which copies are held (and why)
    or still being de-identified. Five queries."""
    rows = [
        row
        for deliveries in _published_deliveries(study_ids)
        for row in deliveries.values("study_id", "center__name", "status")
        .annotate(
            n=Count("id"),
            failed=Count(
                "id", filter=~Q(last_error="") & ~Q(status__in=[Delivery.Status.DELIVERED, Delivery.Status.FAILED])
            ),
            stat=Count("id", filter=Q(priority=Priority.STAT)),
            backfill=Count("id", filter=Q(origin=Delivery.Origin.BACKFILL)),
            first_queued=Min("created_at"),
            last_delivered=Max("delivered_at"),
        )
        .order_by()
    ]
    result: dict[int, dict[str, RecipientStatus]] = {}

    def status_of(study_id: int, center_name: str) -> RecipientStatus:
        return result.setdefault(study_id, {}).setdefault(center_name, RecipientStatus(center_name=center_name))

    for row in rows:
        status = status_of(row["study_id"], row["center__name"])
        status.stat += row["stat"]
        status.backfill += row["backfill"]
        if row["status"] == Delivery.Status.DELIVERED:
            status.delivered += row["n"]
            status.last_delivered_at = max(
                filter(None, [status.last_delivered_at, row["last_delivered"]]), default=None
            )
        elif row["status"] == Delivery.Status.LEASED:
            status.in_flight += row["n"]
        elif row["status"] == Delivery.Status.FAILED:
            status.failed += row["n"]
        else:
            status.queued += row["n"]
        status.failed_attempts += row["failed"]
        status.first_queued_at = min(filter(None, [status.first_queued_at, row["first_queued"]]), default=None)
    # A center may get some instances of a study as published and others de-identified: one count per reason.
    reasons: dict[tuple[int, str, str], int] = {}
    for deliveries in _published_deliveries(study_ids):
        for row in (
            deliveries.filter(status=Delivery.Status.FAILED)
            .values("study_id", "center__name", "last_error")
            .annotate(n=Count("id"))
            .order_by()
        ):
            key = (row["study_id"], row["center__name"], row["last_error"])
            reasons[key] = reasons.get(key, 0) + row["n"]
    for (study_id, center_name, reason), n in sorted(reasons.items(), key=lambda item: (-item[1], item[0][2])):
        result[study_id][center_name].failure_reasons.append((reason, n))
    copies = (
        DeidentifiedCopy.objects.filter(original__series__study_id__in=study_ids)
        .exclude(status=DeidentifiedCopy.Status.MADE)
        .values("original__series__study_id", "center__name", "status", "reason")
        .annotate(n=Count("id"))
        .order_by("-n", "reason")
    )
    for row in copies:
        status = status_of(row["original__series__study_id"], row["center__name"])
        if row["status"] == DeidentifiedCopy.Status.HELD:
            status.held += row["n"]
            status.held_reasons.append((row["reason"], row["n"]))
        elif row["status"] == DeidentifiedCopy.Status.PENDING:
            status.deidentifying += row["n"]
        else:
            status.copy_failed += row["n"]
    return {
        study_id: sorted(per_center.values(), key=lambda r: r.center_name) for study_id, per_center in result.items()
    }


def failed_counts(*, study_ids: list[int], center: Center) -> dict[int, int]:
    """Instances of each study that failed to reach the center."""
    rows = (
        Delivery.objects.filter(instance__series__study_id__in=study_ids, center=center, status=Delivery.Status.FAILED)
        .values("instance__series__study_id")
        .annotate(n=Count("id"))
        .order_by()
    )
    return {row["instance__series__study_id"]: row["n"] for row in rows}


def delivery_marks(*, study_ids: list[int], center: Center) -> dict[int, dict[str, int]]:
    """Per study, how many of the center's deliveries the publisher marked stat and how many a backfill queued."""
    rows = (
        Delivery.objects.filter(instance__series__study_id__in=study_ids, center=center)
        .values("instance__series__study_id")
        .annotate(
            stat=Count("id", filter=Q(priority=Priority.STAT)),
            backfill=Count("id", filter=Q(origin=Delivery.Origin.BACKFILL)),
        )
        .order_by()
    )
    return {row["instance__series__study_id"]: {"stat": row["stat"], "backfill": row["backfill"]} for row in rows}


@dataclass(frozen=True)
class FailedIncoming:
    """Why instances owed to a center failed: per publisher and reason, how many."""

    source_center: str
    reason: str
    count: int
    last_failed_at: datetime | None


def failed_incoming(*, center: Center) -> list[FailedIncoming]:
    rows = (
        Delivery.objects.filter(center=center, status=Delivery.Status.FAILED)
        .values("instance__source_center__name", "last_error")
        .annotate(n=Count("id"), last=Max("failed_at"))
        .order_by("-last")
    )
    return [
        FailedIncoming(
            source_center=row["instance__source_center__name"],
            reason=row["last_error"],
            count=row["n"],
            last_failed_at=row["last"],
        )
        for row in rows
    ]


def unrouted_counts(*, study_ids: list[int]) -> dict[int, int]:
    """Instances not fanned out yet, per study."""
    rows = (
        Instance.objects.filter(series__study_id__in=study_ids, routed_at__isnull=True)
        .values("series__study_id")
        .annotate(n=Count("id"))
    )
    return {row["series__study_id"]: row["n"] for row in rows}


def source_centers_for(*, center: Center) -> QuerySet[Center]:
    """The centers that sent this center anything, for the filter menu."""
    return Center.objects.filter(
        pk__in=Study.objects.filter(series__instances__deliveries__center=center).values("source_center_id")
    ).order_by("name")


def study_get_for_center(*, center: Center, study_uid: str) -> Study | None:
    """A study the center published or received; anything else looks missing."""
    return (
        Study.objects.select_related("patient", "source_center")
        .filter(study_instance_uid=study_uid)
        .filter(Q(source_center=center, derived_for__isnull=True) | Q(series__instances__deliveries__center=center))
        .distinct()
        .first()
    )


def instances_visible(*, center: Center) -> QuerySet[Instance]:
    """Instances the center may open: its own uploads and what was routed to it (for a de-identifying
    recipient, the copies made for it; for their publisher, never those copies)."""
    return Instance.objects.filter(
        Q(source_center=center, derived_for__isnull=True)
        | Q(pk__in=Delivery.objects.filter(center=center).values("instance_id"))
    )


def study_series(*, center: Center, study: Study) -> list[Series]:
    """The study's series that hold instances visible to the center, each with its visible instances counted."""
    visible = instances_visible(center=center).filter(series__study=study)
    series = (
        Series.objects.filter(pk__in=visible.values("series_id"))
        .annotate(instance_count=Count("instances", filter=Q(instances__in=visible)))
        .order_by("series_number", "pk")
    )
    return list(series)


def series_get_for_center(*, center: Center, series_uid: str) -> Series | None:
    return (
        Series.objects.select_related("study__patient", "study__source_center")
        .filter(series_instance_uid=series_uid, instances__in=instances_visible(center=center))
        .distinct()
        .first()
    )


def series_instances(*, center: Center, series: Series) -> list[Instance]:
    """Visible instances of a series in slice order."""
    return list(instances_visible(center=center).filter(series=series).order_by("instance_number", "sop_instance_uid"))


def instance_get_for_center(*, center: Center, sop_uid: str) -> Instance | None:
    return (
        instances_visible(center=center)
        .select_related("series__study__patient")
        .filter(sop_instance_uid=sop_uid)
        .first()
    )


def study_instances(*, center: Center, study: Study) -> QuerySet[Instance]:
    return (
        instances_visible(center=center)
        .filter(series__study=study)
        .select_related("series")
        .order_by("series__series_number", "series_id", "instance_number", "pk")
    )


@dataclass
class Bucket:
    start: datetime
    received_count: int = 0
    received_bytes: int = 0
    sent_count: int = 0
    sent_bytes: int = 0


@dataclass(frozen=True)
class AgentStatus:
    heartbeat: AgentHeartbeat
    online: bool


@dataclass
class Dashboard:
    agent_last_seen: datetime | None
    agents: list[AgentStatus]
    incoming: dict[str, int]
    incoming_failing: int
    outgoing: dict[str, int]
    # Of the deliveries still to go (queued or in flight): the stat ones and the backfilled ones.
    incoming_waiting: dict[str, int] = field(default_factory=dict)
    outgoing_waiting: dict[str, int] = field(default_factory=dict)
    # The center's instances not sent to a de-identifying subscriber (burned-in annotation).
    outgoing_held: int = 0
    hourly: list[Bucket] = field(default_factory=list)
    daily: list[Bucket] = field(default_factory=list)


def _buckets(*, center: Center, since: datetime, step: timedelta, trunc) -> list[Bucket]:
    start = trunc_floor(since, step)
    buckets: dict[datetime, Bucket] = {}
    cursor = start
    now = timezone.now()
    while cursor <= now:
        buckets[cursor] = Bucket(start=cursor)
        cursor += step
    received = (
        Delivery.objects.filter(center=center, created_at__gte=start)
        .annotate(bucket=trunc("created_at"))
        .values("bucket")
        .annotate(n=Count("id"), size=Sum("instance__size"))
    )
    sent = (
        Instance.objects.filter(source_center=center, derived_for__isnull=True, received_at__gte=start)
        .annotate(bucket=trunc("received_at"))
        .values("bucket")
        .annotate(n=Count("id"), size=Sum("size"))
    )
    for direction, rows in (("received", received), ("sent", sent)):
        for row in rows:
            bucket = buckets.get(trunc_floor(row["bucket"], step))
            if bucket:
                setattr(bucket, f"{direction}_count", row["n"])
                setattr(bucket, f"{direction}_bytes", row["size"] or 0)
    return list(buckets.values())


def trunc_floor(moment: datetime, step: timedelta) -> datetime:
    moment = moment.astimezone(timezone.get_current_timezone())
    if step >= timedelta(days=1):
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(minute=0, second=0, microsecond=0)


def center_dashboard(*, center: Center) -> Dashboard:
    def by_status(qs) -> dict[str, int]:
        counts = {status: 0 for status in Delivery.Status.values}
        counts.update(dict(qs.values_list("status").annotate(n=Count("id")).order_by()))
        return counts

    def waiting(qs) -> dict[str, int]:
        return qs.filter(status__in=[Delivery.Status.QUEUED, Delivery.Status.LEASED]).aggregate(
            stat=Count("id", filter=Q(priority=Priority.STAT)),
            backfill=Count("id", filter=Q(origin=Delivery.Origin.BACKFILL)),
        )

    now = timezone.now()
    return Dashboard(
        agent_last_seen=ApiKey.objects.filter(center=center).aggregate(last=Max("last_used_at"))["last"],
        agents=[
            AgentStatus(heartbeat=beat, online=beat.is_online(now))
            for beat in agent_heartbeats_of_center(center=center)
        ],
        incoming=by_status(Delivery.objects.filter(center=center)),
        incoming_failing=Delivery.objects.filter(center=center)
        .exclude(status=Delivery.Status.DELIVERED)
        .exclude(last_error="")
        .count(),
        outgoing=by_status(Delivery.objects.filter(instance__source_center=center)),
        incoming_waiting=waiting(Delivery.objects.filter(center=center)),
        outgoing_waiting=waiting(Delivery.objects.filter(instance__source_center=center)),
        outgoing_held=DeidentifiedCopy.objects.filter(
            original__source_center=center, status=DeidentifiedCopy.Status.HELD
        ).count(),
        hourly=_buckets(center=center, since=now - timedelta(hours=23), step=timedelta(hours=1), trunc=TruncHour),
        daily=_buckets(center=center, since=now - timedelta(days=29), step=timedelta(days=1), trunc=TruncDay),
    )
