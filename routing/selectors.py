from dataclasses import dataclass

from django.db.models import BigIntegerField, Count, Q, QuerySet
from django.db.models.fields.json import KT
from django.db.models.functions import Cast

from centers.models import Center
from routing.models import DeadLetter, DeidentifiedCopy, Delivery, Pseudonym, RoutingDecision, StudyWebhook


def delivery_get_for_center(*, center: Center, delivery_id: int) -> Delivery | None:
    """A delivery of this center, or None: another center's id looks missing."""
    return Delivery.objects.select_related("instance", "center").filter(pk=delivery_id, center=center).first()


def routing_explain(*, instance_id: int, center_id: int) -> list[RoutingDecision]:
    """The patterns that sent this instance to this center."""
    return list(RoutingDecision.objects.filter(instance_id=instance_id, center_id=center_id).order_by("pattern"))


def instances_dead_lettered(*, task_name: str) -> QuerySet:
    """The instance ids (first argument) of open dead letters of a task taking one: a subquery."""
    return (
        DeadLetter.objects.filter(task_name=task_name, status=DeadLetter.Status.OPEN)
        # A row whose argument was left out ("<omitted>") names no instance, and would not cast.
        .annotate(first=KT("args__0"))
        .filter(first__regex=r"^[0-9]+$")
        .annotate(instance_id=Cast("first", BigIntegerField()))
        .values("instance_id")
    )


def deidentified_copies_held(*, center: Center) -> QuerySet[DeidentifiedCopy]:
    """Copies of this center's instances held back from de-identifying recipients, with the reason."""
    return (
        DeidentifiedCopy.objects.filter(original__source_center=center, status=DeidentifiedCopy.Status.HELD)
        .select_related("center", "original__series__study")
        .order_by("-created_at", "-pk")
    )


def pseudonyms_find(*, publisher: Center, query: str, limit: int = 200) -> list[Pseudonym]:
    """The publisher's mappings whose original or pseudonym is exactly `query`, whatever the recipient."""
    query = query.strip()
    if not query:
        return []
    return list(
        Pseudonym.objects.filter(publisher=publisher)
        .filter(Q(original=query) | Q(pseudonym=query))
        .select_related("recipient")
        .order_by("recipient__name", "kind", "pk")[:limit]
    )


@dataclass(frozen=True)
class WebhookTrouble:
    failed: int
    retrying: int
    last_error: str


def webhook_trouble(*, center: Center) -> WebhookTrouble | None:
    """The center's webhooks that failed for good or are being retried; None when all is well."""
    troubled = StudyWebhook.objects.filter(center=center).filter(
        Q(status=StudyWebhook.Status.FAILED) | Q(status=StudyWebhook.Status.PENDING, attempts__gt=0)
    )
    counts = troubled.aggregate(
        failed=Count("pk", filter=Q(status=StudyWebhook.Status.FAILED)),
        retrying=Count("pk", filter=Q(status=StudyWebhook.Status.PENDING)),
    )
    if not counts["failed"] and not counts["retrying"]:
        return None
    last = troubled.order_by("-next_attempt_at", "-pk").values_list("last_error", flat=True).first()
    return WebhookTrouble(failed=counts["failed"], retrying=counts["retrying"], last_error=last or "")
