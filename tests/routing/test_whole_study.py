"""deliver: study: a center's deliveries of a study are leased only once the study is stable, all together."""

import pytest
from django.db import connection
from django.utils import timezone
from pydicom.uid import generate_uid

from centers.models import ApiKey
from centers.services import key_digest
from routing.idle_poll import idle_query
from routing.models import Delivery, Subscription
from tests.dicomfiles import dicom_bytes
from tests.routing.wholestudy import age, make_copy, publish, study_with_copies

pytestmark = pytest.mark.django_db


@pytest.fixture
def copies(agents, network, settings):
    settings.STUDY_STABLE_SECONDS = 60
    return study_with_copies(agents, network)


@pytest.fixture
def whole(network):
    Subscription.objects.filter(center=network["partner"]).update(deliver=Subscription.Deliver.STUDY)
    return network


def test_a_whole_study_is_leased_only_once_no_instance_arrived_for_the_stable_time(agents, whole, settings):
    settings.STUDY_STABLE_SECONDS = 60
    study = generate_uid()
    publish(agents, study, 3)
    assert Delivery.objects.filter(center=whole["partner"], whole_study=True).count() == 3

    assert agents["partner"].lease(limit=10).json() == []
    age(study, 59)
    assert agents["partner"].lease(limit=10).json() == []
    age(study, 61)
    items = agents["partner"].lease(limit=10).json()

    assert len(items) == 3
    assert {i["deliver"] for i in items} == {"study"}
    assert {i["study_instance_uid"] for i in items} == {study}


def test_one_fresh_instance_holds_the_whole_study_back(agents, whole, settings):
    settings.STUDY_STABLE_SECONDS = 60
    study = generate_uid()
    publish(agents, study, 2)
    age(study, 120)
    publish(agents, study, 1, first=3)

    assert agents["partner"].lease(limit=10).json() == []


def test_instance_deliveries_of_an_unstable_study_are_leased_at_once(agents, whole, settings):
    settings.STUDY_STABLE_SECONDS = 60
    study = generate_uid()
    publish(agents, study, 2, modality="NM")

    assert agents["partner"].lease(limit=10).json() == []
    items = agents["outsider"].lease(limit=10).json()
    assert len(items) == 2
    assert {i["deliver"] for i in items} == {"instance"}


def test_a_study_still_arriving_does_not_hold_back_the_center_s_other_deliveries(agents, whole, settings):
    settings.STUDY_STABLE_SECONDS = 60
    partner = whole["partner"]
    Subscription.objects.filter(center=partner).update(pattern="fars.*.ct")
    Subscription.objects.create(center=partner, pattern="fars.*.mr", deliver=Subscription.Deliver.INSTANCE)
    ct_study, mr_study = generate_uid(), generate_uid()
    # The study's deliveries come first in the queue, so the lease meets them before the MR.
    publish(agents, ct_study, 3)
    publish(agents, mr_study, 2, modality="MR")

    items = agents["partner"].lease(limit=2).json()
    assert [(i["study_instance_uid"], i["deliver"]) for i in items] == [(mr_study, "instance")] * 2
    assert agents["partner"].lease(limit=10).json() == []
    age(ct_study, 61)
    rest = agents["partner"].lease(limit=10).json()
    assert [(i["study_instance_uid"], i["deliver"]) for i in rest] == [(ct_study, "study")] * 3


def test_a_lease_takes_a_whole_study_past_its_limit_and_keeps_each_study_together(agents, whole, settings):
    settings.STUDY_STABLE_SECONDS = 60
    first, second = generate_uid(), generate_uid()
    series = {first: generate_uid(), second: generate_uid()}
    # Interleaved, as two modalities publishing at once would send them.
    for number, study in enumerate([first, second, first, second, first], start=1):
        data = dicom_bytes("CT", study_uid=study, series_uid=series[study], instance_number=number)
        assert agents["own"].upload(data).status_code == 201
    age(first, 61)
    age(second, 61)

    lease = agents["partner"].lease(limit=1).json()
    assert [i["study_instance_uid"] for i in lease] == [first] * 3
    rest = agents["partner"].lease(limit=10).json()
    assert [i["study_instance_uid"] for i in rest] == [second] * 2


def test_an_instance_arriving_after_the_study_was_stable_follows_as_a_later_delivery(agents, whole, settings):
    settings.STUDY_STABLE_SECONDS = 60
    study = generate_uid()
    publish(agents, study, 2)
    age(study, 61)
    delivered = agents["partner"].lease(limit=10).json()
    assert agents["partner"].ack_many([(i["id"], i["sha256"]) for i in delivered]).status_code == 200

    publish(agents, study, 1, first=3)
    assert agents["partner"].lease(limit=10).json() == []
    age(study, 61)
    later = agents["partner"].lease(limit=10).json()

    assert len(later) == 1
    assert later[0]["study_instance_uid"] == study
    assert later[0]["id"] not in {i["id"] for i in delivered}


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the idle-poll fast path runs on PostgreSQL only")
def test_the_idle_poll_check_says_nothing_to_lease_while_the_study_is_not_stable(agents, whole, keys, settings):
    settings.STUDY_STABLE_SECONDS = 60
    study = generate_uid()
    publish(agents, study, 2)
    digest = key_digest(keys["partner"])
    ApiKey.objects.filter(digest=digest).update(last_used_at=timezone.now())

    def nothing_to_lease() -> bool:
        with connection.cursor() as cursor:
            cursor.execute(idle_query(settings.STUDY_STABLE_SECONDS), (30, digest))
            return cursor.fetchone()[2]

    assert nothing_to_lease() is True
    age(study, 61)
    assert nothing_to_lease() is False


def test_a_de_identified_study_waits_for_the_copies_still_to_be_made(agents, network, copies):
    first, second = copies["originals"]
    make_copy(first, network["partner"], copies["series"], whole_study=True)
    age(copies["study"], 120)
    age(copies["copy_study"].study_instance_uid, 120)

    assert agents["partner"].lease(limit=10).json() == []
    make_copy(second, network["partner"], copies["series"], whole_study=True)
    assert agents["partner"].lease(limit=10).json() == []  # the copy just made is a new instance of the study
    age(copies["copy_study"].study_instance_uid, 61)
    items = agents["partner"].lease(limit=10).json()

    assert len(items) == 2
    assert {i["study_instance_uid"] for i in items} == {copies["copy_study"].study_instance_uid}


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the idle-poll fast path runs on PostgreSQL only")
def test_the_idle_poll_check_also_waits_for_the_copies_still_to_be_made(agents, network, copies, keys):
    first, second = copies["originals"]
    make_copy(first, network["partner"], copies["series"], whole_study=True)
    age(copies["study"], 120)
    age(copies["copy_study"].study_instance_uid, 120)
    digest = key_digest(keys["partner"])
    ApiKey.objects.filter(digest=digest).update(last_used_at=timezone.now())

    def nothing_to_lease() -> bool:
        with connection.cursor() as cursor:
            cursor.execute(idle_query(60), (30, digest))
            return cursor.fetchone()[2]

    assert nothing_to_lease() is True
    make_copy(second, network["partner"], copies["series"], whole_study=True)
    age(copies["copy_study"].study_instance_uid, 120)
    assert nothing_to_lease() is False
