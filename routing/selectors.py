from django.db.models import BigIntegerField, QuerySet
from django.db.models.fields.json import KT
from django.db.models.functions import Cast

from centers.models import Center
from routing.models import DeadLetter, Delivery, RoutingDecision


def delivery_get_for_center(*, center: Center, delivery_id: int) -> Delivery | None:
    """A delivery of this center, or None: another center's id looks missing."""
    return Delivery.objects.select_related("instance", "center").filter(pk=delivery_id, center=center).first()


def routing_explain(*, instance_id: int, center_id: int) -> list[RoutingDecision]:
    """The patterns that sent this instance to this center."""
    return list(RoutingDecision.objects.filter(instance_id=instance_id, center_id=center_id).order_by("pattern"))


def deliveries_failed(*, center: Center | None = None, publisher: Center | None = None) -> QuerySet[Delivery]:
    """Failed deliveries, newest first: those owed to `center`, or those of `publisher`'s instances."""
    qs = Delivery.objects.filter(status=Delivery.Status.FAILED)
    if center is not None:
        qs = qs.filter(center=center)
    if publisher is not None:
        qs = qs.filter(instance__source_center=publisher)
    return qs.select_related("center", "instance__source_center").order_by("-failed_at", "-pk")


def instances_dead_lettered(*, task_name: str) -> QuerySet:
    """The instance ids (first argument) of open dead letters of a task taking one: a subquery."""
    return (
        DeadLetter.objects.filter(task_name=task_name, status=DeadLetter.Status.OPEN)
        .annotate(instance_id=Cast(KT("args__0"), BigIntegerField()))
        .values("instance_id")
    )
