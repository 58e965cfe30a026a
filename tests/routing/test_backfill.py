"""Backfill on request: a center catches up on what was published before it subscribed."""

from datetime import timedelta
from functools import partial
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from centers.models import AuditEvent
from routing.backfill import BackfillRefused, deliveries_backfill
from routing.models import DeidentifiedCopy, Delivery, Instance, Priority, RoutingDecision, Subscription
from tests.dicomfiles import dicom_bytes

pytestmark = pytest.mark.django_db
TODAY = timezone.localdate()


def backfill(*args: str) -> list[str]:
    out = StringIO()
    call_command("backfill", *args, stdout=out)
    return out.getvalue().splitlines()


def publish(agents, *modalities: str, who: str = "own") -> list[Instance]:
    uids = []
    for modality in modalities:
        response = agents[who].upload(dicom_bytes(modality))
        assert response.status_code == 201, response.content
        uids.append(response.json()["sop_instance_uid"])
    return [Instance.objects.get(sop_instance_uid=uid) for uid in uids]


def test_a_new_subscription_receives_only_what_is_published_from_then_on_and_a_backfill_brings_the_rest(
    agents, network
):
    earlier = publish(agents, "CT", "CT", "MR")
    Subscription.objects.create(center=network["outsider"], pattern="fars.*.ct")
    later = publish(agents, "CT")
    outsider = Delivery.objects.filter(center=network["outsider"])
    assert list(outsider.values_list("instance", "origin")) == [(later[0].pk, "live")]

    lines = backfill("isfahan-nuclear", "--since", TODAY.isoformat())

    assert lines[-1] == "Queued 2 deliveries for isfahan-nuclear."
    backfilled = outsider.filter(origin=Delivery.Origin.BACKFILL)
    assert set(backfilled.values_list("instance", flat=True)) == {earlier[0].pk, earlier[1].pk}
    assert set(backfilled.values_list("priority", "status", "whole_study")) == {(Priority.ROUTINE, "queued", False)}
    # Why it got them: the subscription's pattern, as for live traffic.
    why = RoutingDecision.objects.filter(center=network["outsider"], instance=earlier[0])
    assert set(why.values_list("pattern", flat=True)) == {"fars.*.ct"}


def test_running_it_twice_queues_nothing_new(agents, network):
    publish(agents, "NM", "NM")
    Delivery.objects.filter(center=network["outsider"]).delete()
    assert backfill("isfahan-nuclear", "--since", TODAY.isoformat())[-1] == "Queued 2 deliveries for isfahan-nuclear."
    assert backfill("isfahan-nuclear", "--since", TODAY.isoformat())[-1] == "Queued 0 deliveries for isfahan-nuclear."
    assert Delivery.objects.filter(center=network["outsider"]).count() == 2


def test_what_the_center_got_live_is_not_queued_again(agents, network):
    publish(agents, "CT", "MR")
    assert backfill("tehran-hospital", "--since", TODAY.isoformat())[-1] == "Queued 0 deliveries for tehran-hospital."
    assert set(Delivery.objects.filter(center=network["partner"]).values_list("origin", flat=True)) == {"live"}


def test_only_instances_received_since_that_day_are_queued(agents, network):
    old, recent = publish(agents, "CT", "CT")
    Instance.objects.filter(pk=old.pk).update(received_at=timezone.now() - timedelta(days=10))
    Subscription.objects.create(center=network["outsider"], pattern="fars.#")

    assert deliveries_backfill(center=network["outsider"], since=TODAY - timedelta(days=3)) == 1
    assert list(Delivery.objects.filter(center=network["outsider"]).values_list("instance", flat=True)) == [recent.pk]
    assert deliveries_backfill(center=network["outsider"], since=TODAY - timedelta(days=30)) == 1


def test_a_center_never_gets_its_own_uploads_nor_another_centers_copies(agents, network):
    own_nm = publish(agents, "NM", who="outsider")[0]
    Subscription.objects.create(center=network["outsider"], pattern="#")
    shiraz = publish(agents, "US")[0]  # live: the outsider gets it at once
    copy = Instance.objects.create(
        sop_instance_uid="2.25.1",
        sop_class_uid=shiraz.sop_class_uid,
        series=shiraz.series,
        source_center=shiraz.source_center,
        transfer_syntax_uid=shiraz.transfer_syntax_uid,
        file="copy.dcm",
        size=1,
        sha256="0" * 64,
        routing_key=shiraz.routing_key,
        derived_from=shiraz,
        derived_for=network["partner"],
    )

    assert deliveries_backfill(center=network["outsider"], since=TODAY) == 0
    got = set(Delivery.objects.filter(center=network["outsider"]).values_list("instance", flat=True))
    assert own_nm.pk not in got and copy.pk not in got


def test_a_pattern_replaces_the_subscriptions_and_is_validated(agents, network):
    publish(agents, "CT", "MR")
    assert backfill("isfahan-nuclear", "--since", TODAY.isoformat(), "--pattern", "fars.*.mr")[-1] == (
        "Queued 1 deliveries for isfahan-nuclear."
    )
    [delivery] = Delivery.objects.filter(center=network["outsider"]).select_related("instance")
    assert delivery.instance.routing_key == "fars.shiraz.mr" and delivery.origin == "backfill"
    decision = RoutingDecision.objects.get(center=network["outsider"], instance=delivery.instance)
    assert decision.pattern == "fars.*.mr" and decision.subscription is None
    with pytest.raises(CommandError, match="not a word"):
        backfill("isfahan-nuclear", "--since", TODAY.isoformat(), "--pattern", "fars.shiraz.ct!")


def test_a_backfill_applies_the_centers_options(agents, network):
    ct, mr = publish(agents, "CT", "MR")
    # As if published before the partner subscribed, and before these options were chosen.
    Delivery.objects.all().delete()
    Subscription.objects.filter(center=network["partner"]).update(deidentify="basic", deliver="study")
    Subscription.objects.create(center=network["outsider"], pattern="fars.*.ct", deliver="study")

    assert deliveries_backfill(center=network["outsider"], since=TODAY) == 1
    assert list(Delivery.objects.values_list("center", "instance", "whole_study")) == [
        (network["outsider"].pk, ct.pk, True)
    ]
    # De-identifying: a copy to make, never the original itself; whole studies carried onto the copy.
    assert deliveries_backfill(center=network["partner"], since=TODAY) == 2
    copies = DeidentifiedCopy.objects.filter(center=network["partner"])
    assert set(copies.values_list("original", "status", "origin", "whole_study", "priority")) == {
        (ct.pk, "pending", "backfill", True, Priority.ROUTINE),
        (mr.pk, "pending", "backfill", True, Priority.ROUTINE),
    }
    assert not Delivery.objects.filter(center=network["partner"]).exists()
    assert deliveries_backfill(center=network["partner"], since=TODAY) == 0


def test_a_backfill_queues_a_stat_instance_as_routine(agents, network, django_capture_on_commit_callbacks):
    with agents["own"].on_commit(execute=True):
        response = agents["own"].client.post(
            "/api/v1/instances?priority=stat",
            data=dicom_bytes("CT"),
            content_type="application/dicom",
            **agents["own"].auth,
        )
    assert response.status_code == 201, response.content
    stat = Instance.objects.get(priority=Priority.STAT)
    Delivery.objects.all().delete()
    Subscription.objects.create(center=network["outsider"], pattern="fars.*.ct")
    Subscription.objects.filter(center=network["partner"]).update(deidentify="basic")

    with django_capture_on_commit_callbacks() as callbacks:
        assert deliveries_backfill(center=network["outsider"], since=TODAY) == 1
        assert deliveries_backfill(center=network["partner"], since=TODAY) == 1

    delivery = Delivery.objects.get(center=network["outsider"], instance=stat)
    copy = DeidentifiedCopy.objects.get(center=network["partner"], original=stat)
    assert (delivery.priority, copy.priority) == (Priority.ROUTINE, Priority.ROUTINE)
    # Its copy is made among routine work, not in the stat queue.
    assert [cb.args for cb in callbacks if isinstance(cb, partial) and cb.func.__name__ == "_queue_deidentify"] == [
        (copy.pk, Priority.ROUTINE)
    ]


def test_a_pattern_outside_the_subscriptions_still_gets_the_strictest_options(agents, network):
    [ct] = publish(agents, "CT")
    Delivery.objects.all().delete()
    Subscription.objects.filter(center=network["partner"]).update(pattern="fars.*.mr", deidentify="basic")
    assert deliveries_backfill(center=network["partner"], since=TODAY, pattern="fars.#") == 1
    assert DeidentifiedCopy.objects.get(center=network["partner"]).original == ct
    assert not Delivery.objects.filter(center=network["partner"]).exists()


def test_it_works_in_batches_and_is_audited_once_per_run(agents, network, admin_user):
    publish(agents, "NM", "NM", "NM", "NM", "NM")
    Delivery.objects.filter(center=network["outsider"]).delete()

    assert deliveries_backfill(center=network["outsider"], since=TODAY, user=admin_user, batch=2, pause=0) == 5

    [event] = AuditEvent.objects.filter(action="delivery.backfill")
    assert event.center == network["outsider"] and event.user == admin_user
    assert event.detail == {
        "since": TODAY.isoformat(),
        "pattern": "",
        "queued": 5,
        "batches": 3,
        "completed": True,
    }


@pytest.mark.parametrize(
    "change, sentence",
    [({"is_active": False}, "is inactive"), ({"may_subscribe": False}, "may not subscribe")],
)
def test_a_center_that_may_not_receive_is_refused_with_a_sentence(agents, network, change, sentence):
    publish(agents, "NM")
    Delivery.objects.all().delete()
    network["outsider"].__class__.objects.filter(pk=network["outsider"].pk).update(**change)
    with pytest.raises(CommandError, match=sentence):
        backfill("isfahan-nuclear", "--since", TODAY.isoformat())
    with pytest.raises(BackfillRefused):
        deliveries_backfill(center=network["outsider"].__class__.objects.get(slug="isfahan-nuclear"), since=TODAY)
    assert not Delivery.objects.exists()
    assert not AuditEvent.objects.filter(action="delivery.backfill").exists()


@pytest.mark.parametrize(
    "args, sentence",
    [
        (["nowhere", "--since", "2026-01-01"], "No center has the slug"),
        (["isfahan-nuclear", "--since", "01/02/2026"], "YYYY-MM-DD"),
    ],
)
def test_bad_arguments_are_refused_with_a_sentence(network, args, sentence):
    with pytest.raises(CommandError, match=sentence):
        backfill(*args)


def test_the_admin_action_asks_for_a_day_then_backfills_in_the_background(
    agents, network, admin_client, admin_user, django_capture_on_commit_callbacks
):
    publish(agents, "CT", "CT")
    subscription = Subscription.objects.create(center=network["outsider"], pattern="fars.*.ct")
    chosen = {"action": "backfill", "_selected_action": [subscription.pk]}

    page = admin_client.post("/admin/routing/subscription/", chosen)
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="backfill-form"' in html and "fars.*.ct" in html
    assert (TODAY - timedelta(days=30)).isoformat() in html
    assert not Delivery.objects.filter(center=network["outsider"]).exists()

    with django_capture_on_commit_callbacks(execute=True):
        done = admin_client.post(
            "/admin/routing/subscription/", {**chosen, "since": TODAY.isoformat(), "apply": "Backfill"}, follow=True
        )
    assert "Backfill since" in done.content.decode()
    assert Delivery.objects.filter(center=network["outsider"], origin="backfill").count() == 2
    event = AuditEvent.objects.get(action="delivery.backfill")
    assert event.user == admin_user and event.detail["pattern"] == "fars.*.ct" and event.detail["queued"] == 2


def test_the_admin_action_refuses_an_inactive_subscription(agents, network, admin_client):
    publish(agents, "CT")
    subscription = Subscription.objects.create(center=network["outsider"], pattern="fars.*.ct", is_active=False)
    done = admin_client.post(
        "/admin/routing/subscription/",
        {"action": "backfill", "_selected_action": [subscription.pk], "since": TODAY.isoformat(), "apply": "1"},
        follow=True,
    )
    assert "is inactive: activate it first" in done.content.decode()
    assert not Delivery.objects.filter(center=network["outsider"]).exists()


def test_a_center_without_subscriptions_is_told_why_nothing_was_queued(agents, network):
    publish(agents, "CT")
    Subscription.objects.filter(center=network["partner"]).update(is_active=False)
    Delivery.objects.all().delete()
    out, err = StringIO(), StringIO()
    call_command("backfill", "tehran-hospital", "--since", TODAY.isoformat(), stdout=out, stderr=err)
    assert "no active subscription" in err.getvalue()
    assert out.getvalue().splitlines()[-1] == "Queued 0 deliveries for tehran-hospital."


def test_with_a_broker_the_admins_backfill_runs_one_batch_per_task_then_queues_the_next(
    agents, network, admin_user, monkeypatch
):
    from routing import backfill as service
    from routing import tasks

    publish(agents, "NM", "NM", "NM")
    Delivery.objects.all().delete()
    subscription = Subscription.objects.get(center=network["outsider"])
    monkeypatch.setitem(tasks.backfill_subscription.app.conf, "task_always_eager", False)
    real_batch = service.backfill_batch
    monkeypatch.setattr(service, "backfill_batch", lambda **kwargs: real_batch(**{**kwargs, "batch": 2}))
    queued_next = []
    monkeypatch.setattr(tasks.backfill_subscription, "delay", lambda *args: queued_next.append(args))

    tasks.backfill_subscription(subscription.pk, TODAY.isoformat(), admin_user.pk)
    [args] = queued_next
    assert Delivery.objects.filter(center=network["outsider"]).count() == 2
    assert not AuditEvent.objects.filter(action="delivery.backfill").exists()
    assert args[:2] == (subscription.pk, TODAY.isoformat()) and args[4:6] == (2, 1) and args[6] == ["fars.shiraz.nm"]

    tasks.backfill_subscription(*args)
    assert len(queued_next) == 1  # the last batch: nothing queued after it
    assert Delivery.objects.filter(center=network["outsider"], origin="backfill").count() == 3
    [event] = AuditEvent.objects.filter(action="delivery.backfill")
    assert event.user == admin_user
    assert event.detail == {"since": TODAY.isoformat(), "pattern": "#.nm", "queued": 3, "batches": 2, "completed": True}


def test_a_center_deactivated_during_a_run_gets_nothing_more(agents, network, monkeypatch):
    from routing import backfill as service

    publish(agents, "NM", "NM", "NM")
    Delivery.objects.all().delete()
    real_batch = service.backfill_batch

    def batch_then_deactivate(**kwargs):
        done = real_batch(**{**kwargs, "batch": 1})
        network["outsider"].__class__.objects.filter(pk=network["outsider"].pk).update(is_active=False)
        return done

    monkeypatch.setattr(service, "backfill_batch", batch_then_deactivate)
    with pytest.raises(CommandError, match="is inactive"):
        backfill("isfahan-nuclear", "--since", TODAY.isoformat())
    assert Delivery.objects.filter(center=network["outsider"]).count() == 1
    [event] = AuditEvent.objects.filter(action="delivery.backfill")
    assert (event.detail["queued"], event.detail["completed"]) == (1, False)


def test_a_backfill_batch_takes_as_many_queries_for_six_instances_as_for_two(agents, network):
    counts = []
    for count in (2, 6):
        # As if published before the partner subscribed; the last run's are the partner's already.
        Delivery.objects.filter(instance__in=publish(agents, *["CT", "MR"] * (count // 2))).delete()
        with CaptureQueriesContext(connection) as captured:
            assert deliveries_backfill(center=network["partner"], since=TODAY) == count
        counts.append(len(captured))
    assert counts[0] == counts[1]
