"""Fan-out: who gets a delivery, why, and only once."""

import pytest

from routing.models import Delivery, Instance, RoutingDecision, Subscription
from routing.services import instance_route, instances_route_unrouted
from tests.dicomfiles import dicom_bytes

pytestmark = pytest.mark.django_db


def delivered_to(instance):
    return set(Delivery.objects.filter(instance=instance).values_list("center__slug", flat=True))


def test_it_delivers_to_the_subscribed_centers_only(agents):
    agents["own"].upload(dicom_bytes("CT"))
    assert delivered_to(Instance.objects.get()) == {"tehran-hospital"}


def test_it_records_the_pattern_that_matched(agents, network):
    agents["own"].upload(dicom_bytes("NM"))
    decisions = {(d.center.slug, d.pattern) for d in RoutingDecision.objects.select_related("center")}
    assert decisions == {("tehran-hospital", "fars.#"), ("isfahan-nuclear", "#.nm")}


def test_two_matching_patterns_of_one_center_give_one_delivery(agents, network):
    Subscription.objects.create(center=network["partner"], pattern="*.*.ct")
    agents["own"].upload(dicom_bytes("CT"))
    assert Delivery.objects.filter(center=network["partner"]).count() == 1
    assert RoutingDecision.objects.filter(center=network["partner"]).count() == 2


def test_a_center_never_receives_its_own_upload(agents, network):
    Subscription.objects.create(center=network["outsider"], pattern="#")
    agents["outsider"].upload(dicom_bytes("NM"))
    assert "isfahan-nuclear" not in delivered_to(Instance.objects.get())


def test_an_inactive_subscription_matches_nothing(agents, network):
    Subscription.objects.filter(center=network["partner"]).update(is_active=False)
    agents["own"].upload(dicom_bytes("CT"))
    assert delivered_to(Instance.objects.get()) == set()


def test_an_inactive_center_receives_nothing(agents, network):
    network["partner"].is_active = False
    network["partner"].save()
    agents["own"].upload(dicom_bytes("CT"))
    assert delivered_to(Instance.objects.get()) == set()


def test_routing_twice_is_a_no_op(agents):
    agents["own"].upload(dicom_bytes("CT"))
    instance = Instance.objects.get()
    assert instance.routed_at is not None
    assert instance_route(instance_id=instance.pk) is None
    assert Delivery.objects.count() == 1


def test_the_sweep_routes_an_instance_whose_fanout_never_ran(agents, monkeypatch):
    from routing import services

    # The web process dies between commit and publish: the task is never queued.
    monkeypatch.setattr(services, "_queue_route", lambda instance_id, priority=0: None)
    agents["own"].upload(dicom_bytes("CT"))
    instance = Instance.objects.get()
    assert instance.routed_at is None
    assert Delivery.objects.count() == 0

    from datetime import timedelta

    assert instances_route_unrouted(older_than=timedelta(0)) == 1
    assert delivered_to(instance) == {"tehran-hospital"}


def test_an_upload_succeeds_when_the_broker_is_unreachable(agents, settings, monkeypatch):
    """A committed upload is accepted even if publishing its fan-out fails; the sweep routes it."""
    from kombu.exceptions import OperationalError

    from routing import tasks

    def broker_down(*args, **kwargs):
        raise OperationalError("[Errno 111] Connection refused")

    monkeypatch.setattr(tasks.route_instance, "apply_async", broker_down)
    response = agents["own"].upload(dicom_bytes("CT"))
    assert response.status_code == 201
    assert Instance.objects.get().routed_at is None
