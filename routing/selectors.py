from centers.models import Center
from routing.models import Delivery, RoutingDecision


def delivery_get_for_center(*, center: Center, delivery_id: int) -> Delivery | None:
    """A delivery of this center, or None: another center's id looks missing."""
    return Delivery.objects.select_related("instance", "center").filter(pk=delivery_id, center=center).first()


def routing_explain(*, instance_id: int, center_id: int) -> list[RoutingDecision]:
    """The patterns that sent this instance to this center."""
    return list(RoutingDecision.objects.filter(instance_id=instance_id, center_id=center_id).order_by("pattern"))
