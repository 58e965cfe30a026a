"""The fan-out with subscription options: per center the strictest options, copies instead of deliveries
for de-identifying centers, and nothing written twice, on both of the fan-out's write paths."""

import pytest
from django.db import connection, transaction

from routing.fanout import fanout_write
from routing.models import DeidentifiedCopy, Delivery, Instance, Priority, Subscription
from routing.patterns import recipient_options, route
from routing.services import subscriptions_active
from tests.dicomfiles import dicom_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture(params=["one statement", "orm"])
def write_path(request, monkeypatch):
    """PostgreSQL writes the fan-out in one statement; other databases through the ORM. Run both here."""
    if request.param == "orm":
        monkeypatch.setattr(connection, "vendor", "sqlite")
    elif connection.vendor != "postgresql":
        pytest.skip("the one-statement fan-out is PostgreSQL's")
    return request.param


@pytest.fixture
def instance(agents, network, write_path):
    Subscription.objects.filter(center=network["partner"]).delete()
    agents["own"].upload(dicom_bytes("CT"))
    return Instance.objects.get()


def fan_out(instance, *, origin="live", priority=Priority.ROUTINE):
    matches = route(instance.routing_key, subscriptions_active(), exclude_center_id=instance.source_center_id)
    with transaction.atomic():
        return fanout_write(
            instance=instance,
            matches=matches,
            options=recipient_options(matches),
            priority=priority,
            origin=origin,
            mark_routed=False,
        )


def test_a_plain_subscription_gets_a_delivery_with_the_priority_and_origin(instance, network):
    Subscription.objects.create(center=network["partner"], pattern="fars.#")
    written = fan_out(instance, origin="backfill", priority=Priority.STAT)
    delivery = Delivery.objects.get(center=network["partner"])
    assert written.delivery_centers == [network["partner"].pk] and written.copy_ids == []
    assert (delivery.priority, delivery.origin, delivery.whole_study) == (Priority.STAT, "backfill", False)


def test_a_deidentifying_center_gets_a_copy_to_make_and_no_delivery_of_the_original(instance, network):
    Subscription.objects.create(center=network["partner"], pattern="fars.#", deidentify="basic", deliver="study")
    written = fan_out(instance)
    copy = DeidentifiedCopy.objects.get()
    assert written.copy_ids == [copy.pk] and written.delivery_centers == []
    assert (copy.original, copy.center, copy.status, copy.whole_study) == (
        instance,
        network["partner"],
        DeidentifiedCopy.Status.PENDING,
        True,
    )
    assert not Delivery.objects.filter(center=network["partner"]).exists()


def test_the_stricter_options_of_two_matching_patterns_win(instance, network):
    Subscription.objects.create(center=network["partner"], pattern="fars.#", deliver="study")
    Subscription.objects.create(center=network["partner"], pattern="*.*.ct", deidentify="basic")
    fan_out(instance)
    copy = DeidentifiedCopy.objects.get(center=network["partner"])
    assert copy.whole_study is True


def test_a_second_fan_out_writes_nothing_new(instance, network):
    Subscription.objects.create(center=network["partner"], pattern="fars.#")
    Subscription.objects.create(center=network["outsider"], pattern="#", deidentify="basic")
    first = fan_out(instance)
    again = fan_out(instance, origin="backfill")
    assert first.delivery_centers == [network["partner"].pk] and len(first.copy_ids) == 1
    assert again.delivery_centers == [] and again.copy_ids == []
    assert Delivery.objects.count() == 1 and DeidentifiedCopy.objects.count() == 1


def test_a_center_already_served_plainly_gets_no_copy_when_its_subscription_turns_deidentifying(instance, network):
    subscription = Subscription.objects.create(center=network["partner"], pattern="fars.#")
    fan_out(instance)
    subscription.deidentify = "basic"
    subscription.save()
    written = fan_out(instance)
    assert written.copy_ids == [] and not DeidentifiedCopy.objects.exists()
