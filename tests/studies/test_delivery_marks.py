"""Held, stat and backfilled deliveries show for what they are on the Sent, Received and Dashboard pages."""

import re

import pytest
from django.utils import timezone

from routing.backfill import deliveries_backfill
from routing.models import DeidentifiedCopy, Delivery, Instance, Patient, Priority, Series, Study, Subscription

pytestmark = pytest.mark.django_db
BURNED_IN = "Burned In Annotation is YES: the pixels may show who the patient is"


def _copy_of(original: Instance, center) -> Instance:
    """A de-identified copy as the de-identification task leaves it: rows of its own, for one recipient."""
    patient = Patient.objects.create(center=original.source_center, patient_id="PSEUDO-1", derived_for=center)
    study = Study.objects.create(
        study_instance_uid="2.25.100", patient=patient, source_center=original.source_center, derived_for=center
    )
    series = Series.objects.create(series_instance_uid="2.25.101", study=study, modality=original.series.modality)
    return Instance.objects.create(
        sop_instance_uid="2.25.102",
        sop_class_uid=original.sop_class_uid,
        series=series,
        source_center=original.source_center,
        transfer_syntax_uid=original.transfer_syntax_uid,
        file="copies/x.dcm",
        size=original.size,
        sha256="1" * 64,
        routing_key=original.routing_key,
        derived_from=original,
        derived_for=center,
    )


@pytest.fixture
def marked(study, network):
    """Of the published study: two of Tehran's deliveries stat; Isfahan subscribed (de-identified) afterwards
    and was backfilled: one copy held, one made and queued, three still to make."""
    partner = Delivery.objects.filter(center=network["partner"]).order_by("pk")
    Delivery.objects.filter(pk__in=list(partner.values_list("pk", flat=True)[:2])).update(priority=Priority.STAT)
    Subscription.objects.create(center=network["outsider"], pattern="fars.#", deidentify="basic")
    assert deliveries_backfill(center=network["outsider"], since=timezone.localdate()) == 5
    held, made, *_ = DeidentifiedCopy.objects.filter(center=network["outsider"]).order_by("pk")
    DeidentifiedCopy.objects.filter(pk=held.pk).update(status=DeidentifiedCopy.Status.HELD, reason=BURNED_IN)
    copy = _copy_of(made.original, network["outsider"])
    DeidentifiedCopy.objects.filter(pk=made.pk).update(status=DeidentifiedCopy.Status.MADE, copy=copy)
    Delivery.objects.create(instance=copy, center=network["outsider"], origin=Delivery.Origin.BACKFILL)
    return Study.objects.get(study_instance_uid=study["uid"])


def recipient(response, study: Study, name: str):
    [row] = [row for row in response.context["rows"] if row["study"].pk == study.pk]
    return next(r for r in row["recipients"] if r.center_name == name)


def test_the_sent_page_shows_stat_backfill_held_and_copies_being_made_per_recipient(clinicians, marked):
    response = clinicians["own"].get("/sent/")
    tehran = recipient(response, marked, "Tehran Hospital")
    assert (tehran.total, tehran.stat, tehran.backfill, tehran.held) == (5, 2, 0, 0)
    isfahan = recipient(response, marked, "Isfahan Nuclear")
    # The copy's delivery counts under the published study it was made from.
    assert (isfahan.total, isfahan.queued, isfahan.backfill, isfahan.stat) == (1, 1, 1, 0)
    assert (isfahan.held, isfahan.deidentifying, isfahan.held_reasons) == (1, 3, [(BURNED_IN, 1)])

    html = response.content.decode()
    row = re.search(rf'<tr data-study-uid="{marked.study_instance_uid}">.*?</tr>', html, re.S).group(0)
    assert '<span class="mark stat"' in row and ">2 stat</span>" in row
    assert ">1 backfill</span>" in row and ">1 held</span>" in row
    assert f"1 held, not sent: {BURNED_IN}" in row
    assert "3 being de-identified" in row


def test_a_recipient_with_only_held_copies_is_shown_as_held(clinicians, study, network):
    Subscription.objects.create(center=network["outsider"], pattern="fars.*.mr", deidentify="basic")
    deliveries_backfill(center=network["outsider"], since=timezone.localdate())
    DeidentifiedCopy.objects.update(status=DeidentifiedCopy.Status.HELD, reason=BURNED_IN)
    response = clinicians["own"].get("/sent/")
    isfahan = recipient(response, Study.objects.get(study_instance_uid=study["uid"]), "Isfahan Nuclear")
    assert (isfahan.state, isfahan.held, isfahan.total) == ("held", 2, 0)
    assert '<span class="state held">held</span>' in response.content.decode()


def test_the_dashboards_count_stat_backfill_and_held(clinicians, marked):
    publisher = clinicians["own"].get("/dashboard/")
    data = publisher.context["dashboard"]
    assert data.outgoing_held == 1
    assert data.outgoing_waiting == {"stat": 2, "backfill": 1}
    html = publisher.content.decode()
    assert re.search(r'id="outgoing-held">1<', html)
    assert "not sent to a de-identifying subscriber" in html

    tehran = clinicians["partner"].get("/dashboard/").context["dashboard"]
    assert tehran.incoming_waiting == {"stat": 2, "backfill": 0} and tehran.outgoing_held == 0
    isfahan = clinicians["outsider"].get("/dashboard/")
    assert isfahan.context["dashboard"].incoming_waiting == {"stat": 0, "backfill": 1}
    assert re.search(r'id="incoming-waiting">.*?>0 stat<.*?>1 backfill<', isfahan.content.decode(), re.S)


def test_what_is_delivered_no_longer_counts_as_waiting(clinicians, marked, agents):
    for item in agents["partner"].lease(limit=10).json():
        agents["partner"].ack(item["id"], item["sha256"])
    assert clinicians["partner"].get("/dashboard/").context["dashboard"].incoming_waiting == {"stat": 0, "backfill": 0}


def test_the_received_page_marks_stat_and_backfilled_studies(clinicians, marked):
    tehran = clinicians["partner"].get("/received/")
    [row] = tehran.context["rows"]
    assert row["marks"] == {"stat": 2, "backfill": 0}
    assert '<span class="mark stat"' in tehran.content.decode()
    assert '<span class="mark backfill"' not in tehran.content.decode()

    isfahan = clinicians["outsider"].get("/received/")
    [row] = isfahan.context["rows"]
    assert row["study"].study_instance_uid == "2.25.100" and row["marks"] == {"stat": 0, "backfill": 1}
    assert '<span class="mark backfill"' in isfahan.content.decode()


def test_a_recipient_of_some_instances_as_published_and_some_de_identified_is_one_line(clinicians, study, network):
    Subscription.objects.create(center=network["outsider"], pattern="fars.*.ct", deidentify="basic")
    Subscription.objects.create(center=network["outsider"], pattern="fars.*.mr")
    assert deliveries_backfill(center=network["outsider"], since=timezone.localdate()) == 5
    made = DeidentifiedCopy.objects.filter(center=network["outsider"]).order_by("pk").first()
    copy = _copy_of(made.original, network["outsider"])
    DeidentifiedCopy.objects.filter(pk=made.pk).update(status=DeidentifiedCopy.Status.MADE, copy=copy)
    Delivery.objects.create(instance=copy, center=network["outsider"], origin=Delivery.Origin.BACKFILL)
    Delivery.objects.filter(center=network["outsider"]).update(status=Delivery.Status.FAILED, last_error="gone")

    isfahan = recipient(
        clinicians["own"].get("/sent/"), Study.objects.get(study_instance_uid=study["uid"]), "Isfahan Nuclear"
    )
    assert (isfahan.failed, isfahan.backfill, isfahan.deidentifying) == (3, 3, 2)
    assert isfahan.failure_reasons == [("gone", 3)]
