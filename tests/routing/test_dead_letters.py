"""A task that keeps failing is dead-lettered: recorded once per task and arguments, shown in
the admin, retried from there, and never retried on its own forever."""

from datetime import timedelta

import pytest

from centers.models import AuditEvent
from routing.models import DeadLetter, Delivery, Instance
from routing.services import instances_route_unrouted
from routing.tasks import route_instance
from tests.dicomfiles import dicom_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def unroutable(agents, monkeypatch):
    """A committed instance whose stored routing key is broken, its fan-out not run yet."""
    from routing import services

    monkeypatch.setattr(services, "_queue_route", lambda instance_id, priority=0: None)
    assert agents["own"].upload(dicom_bytes("CT")).status_code == 201
    instance = Instance.objects.get()
    Instance.objects.filter(pk=instance.pk).update(routing_key="fars.shiraz")
    return instance


def run(task, *args):
    """Run a task here, as without a broker; its failure is recorded before it propagates."""
    with pytest.raises(Exception) as failure:
        task.apply(args=args, throw=True)
    return failure.value


def test_a_task_that_fails_is_recorded_with_its_keys_exception_and_traceback(unroutable):
    error = run(route_instance, unroutable.pk)
    letter = DeadLetter.objects.get()
    assert letter.task_name == "routing.tasks.route_instance"
    assert letter.args == [unroutable.pk] and letter.kwargs == {} and letter.retryable
    assert letter.exception_class == "routing.services.Unroutable"
    assert letter.message == str(error) and "fars.shiraz" in letter.message
    assert "instance_route" in letter.traceback
    assert letter.failures == 1 and letter.first_failed_at == letter.last_failed_at
    assert letter.status == DeadLetter.Status.OPEN
    assert AuditEvent.objects.filter(action="task.dead_letter", object_id=str(letter.pk)).exists()
    assert Instance.objects.get(pk=unroutable.pk).routed_at is None


def test_the_same_task_failing_again_counts_on_the_same_row(unroutable):
    run(route_instance, unroutable.pk)
    run(route_instance, unroutable.pk)
    letter = DeadLetter.objects.get()
    assert letter.failures == 2 and letter.last_failed_at > letter.first_failed_at


def test_arguments_that_are_not_keys_are_never_stored(agents, monkeypatch):
    run(route_instance, "Rostami^Sara")
    letter = DeadLetter.objects.get()
    assert letter.args == ["<omitted>"] and not letter.retryable
    stored = f"{letter.args} {letter.message} {letter.traceback}"
    assert "Rostami" not in stored and letter.exception_class.endswith("ValueError")
    # Such a row names no instance: the sweep goes on routing the others.
    from routing import services

    monkeypatch.setattr(services, "_queue_route", lambda instance_id, priority=0: None)
    agents["own"].upload(dicom_bytes("CT"))
    assert instances_route_unrouted(older_than=timedelta(0)) == 1


def test_the_sweep_leaves_a_dead_lettered_instance_to_the_administrator(unroutable, agents):
    good = agents["own"].upload(dicom_bytes("MR")).json()
    # The sweep runs the fan-outs it queues here (no broker): the broken one fails on
    # its own and is recorded, the other is routed.
    assert instances_route_unrouted(older_than=timedelta(0)) == 1
    assert Instance.objects.get(sop_instance_uid=good["sop_instance_uid"]).routed_at is not None
    assert DeadLetter.objects.get().failures == 1
    # The next sweeps do not try it again every minute.
    assert instances_route_unrouted(older_than=timedelta(0)) == 0
    assert DeadLetter.objects.get().failures == 1


def test_the_admin_lists_dead_letters_and_its_retry_queues_the_task_again(unroutable, admin_client, admin_user):
    run(route_instance, unroutable.pk)
    letter = DeadLetter.objects.get()
    listing = admin_client.get("/admin/routing/deadletter/?status__exact=open").content.decode()
    assert "routing.tasks.route_instance" in listing and "routing.services.Unroutable" in listing
    assert admin_client.get(f"/admin/routing/deadletter/{letter.pk}/change/").status_code == 200

    # The administrator repairs the cause, then retries.
    Instance.objects.filter(pk=unroutable.pk).update(routing_key="fars.shiraz.ct")
    response = admin_client.post(
        "/admin/routing/deadletter/", {"action": "retry", "_selected_action": [letter.pk]}, follow=True
    )
    assert "1 task(s) queued again." in response.content.decode()
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.RETRIED and letter.retried_at is not None
    assert Instance.objects.get(pk=unroutable.pk).routed_at is not None
    assert Delivery.objects.filter(instance=unroutable).count() == 1
    retry = AuditEvent.objects.get(action="task.retry", object_id=str(letter.pk))
    assert retry.detail["by"] == admin_user.username


def test_a_retried_task_that_fails_again_is_open_again(unroutable, admin_client):
    run(route_instance, unroutable.pk)
    letter = DeadLetter.objects.get()
    admin_client.post("/admin/routing/deadletter/", {"action": "retry", "_selected_action": [letter.pk]})
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.OPEN and letter.failures == 2


def test_a_row_without_its_arguments_is_not_retried(agents, admin_client):
    run(route_instance, "Rostami^Sara")
    letter = DeadLetter.objects.get()
    response = admin_client.post(
        "/admin/routing/deadletter/", {"action": "retry", "_selected_action": [letter.pk]}, follow=True
    )
    assert "0 task(s) queued again. 1 could not be" in response.content.decode()
    assert DeadLetter.objects.get().status == DeadLetter.Status.OPEN
