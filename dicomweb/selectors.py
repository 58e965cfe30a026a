"""What a center may see over DICOMweb: the instances it published or was sent.

Visibility is decided per instance (a center subscribed to CT only never sees
the MR series of the same study), and studies and series are visible through
their visible instances. Everything outside looks exactly like a missing UID.
"""

from django.db.models import Exists, OuterRef, Q, QuerySet

from centers.models import Center
from routing.models import Delivery, Instance, Series, Study


def instances_visible(*, center: Center) -> QuerySet[Instance]:
    received = Delivery.objects.filter(instance=OuterRef("pk"), center=center)
    # A copy de-identified for a recipient is that recipient's alone, never one more study of its publisher.
    return Instance.objects.filter(Q(source_center=center, derived_for__isnull=True) | Exists(received))


def series_visible(*, center: Center) -> QuerySet[Series]:
    return Series.objects.filter(Exists(instances_visible(center=center).filter(series=OuterRef("pk"))))


def studies_visible(*, center: Center) -> QuerySet[Study]:
    return Study.objects.filter(Exists(instances_visible(center=center).filter(series__study=OuterRef("pk"))))


def instances_in(
    *, center: Center, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> QuerySet[Instance]:
    """The visible instances under a study, series or instance, in the order a viewer stacks them."""
    instances = instances_visible(center=center).filter(series__study__study_instance_uid=study_uid)
    if series_uid is not None:
        instances = instances.filter(series__series_instance_uid=series_uid)
    if sop_uid is not None:
        instances = instances.filter(sop_instance_uid=sop_uid)
    return instances.select_related("series__study").order_by(
        "series__series_number", "series_id", "instance_number", "pk"
    )
