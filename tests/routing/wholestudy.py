"""Whole studies in the tests: publishing one, ageing it, and de-identified copies made by hand."""

from datetime import timedelta

from django.utils import timezone
from pydicom.uid import generate_uid

from routing.models import DeidentifiedCopy, Delivery, Instance, Patient, Series, Study, Subscription
from tests.dicomfiles import dicom_bytes


def publish(agents, study_uid: str, count: int, modality: str = "CT", first: int = 1) -> None:
    series_uid = generate_uid()
    for number in range(first, first + count):
        data = dicom_bytes(modality, study_uid=study_uid, series_uid=series_uid, instance_number=number)
        assert agents["own"].upload(data).status_code == 201


def age(study_uid: str, seconds: float) -> None:
    """As if the study's instances had arrived `seconds` ago."""
    Instance.objects.filter(series__study__study_instance_uid=study_uid).update(
        received_at=timezone.now() - timedelta(seconds=seconds)
    )


def make_copy(original: Instance, center, copy_series: Series, *, whole_study: bool) -> Delivery:
    """What the de-identification task leaves: the copy's row in the copy's series, and its delivery."""
    copy = Instance.objects.create(
        sop_instance_uid=generate_uid(),
        sop_class_uid=original.sop_class_uid,
        series=copy_series,
        source_center=original.source_center,
        transfer_syntax_uid=original.transfer_syntax_uid,
        file=original.file,
        size=original.size,
        sha256=original.sha256,
        routing_key=original.routing_key,
        derived_from=original,
        derived_for=center,
    )
    DeidentifiedCopy.objects.filter(original=original, center=center).update(
        status=DeidentifiedCopy.Status.MADE, copy=copy, made_at=timezone.now()
    )
    return Delivery.objects.create(instance=copy, center=center, whole_study=whole_study)


def study_with_copies(agents, network) -> dict:
    """A study of two originals for the partner to receive de-identified, neither copy made yet."""
    # The copies are made by hand here, as routing.tasks.deidentify_copy would.
    Subscription.objects.filter(center=network["partner"]).update(is_active=False)
    study = generate_uid()
    publish(agents, study, 2)
    first, second = Instance.objects.filter(series__study__study_instance_uid=study).order_by("pk")
    partner = network["partner"]
    for original in (first, second):
        DeidentifiedCopy.objects.create(original=original, center=partner)
    patient = Patient.objects.create(center=network["own"], derived_for=partner, patient_id="ANON-1")
    copy_study = Study.objects.create(
        study_instance_uid=generate_uid(), patient=patient, source_center=network["own"], derived_for=partner
    )
    copy_series = Series.objects.create(series_instance_uid=generate_uid(), study=copy_study, modality="CT")
    return {"study": study, "copy_study": copy_study, "series": copy_series, "originals": (first, second)}
