"""STAT first: the upload's priority, lease order, the stat task queue and a stat re-upload."""

import pytest
from django.db import connection

from routing import delivery_services, services
from routing.models import DeidentifiedCopy, Delivery, Instance, Priority
from tests.dicomfiles import dicom_bytes

pytestmark = pytest.mark.django_db


def upload(agent, body: bytes, priority: str | None = None):
    query = f"?priority={priority}" if priority is not None else ""
    with agent.on_commit(execute=True):
        return agent.client.post(
            f"/api/v1/instances{query}",
            data=body,
            content_type="application/dicom",
            CONTENT_TYPE="application/dicom",
            **agent.auth,
        )


def routine_backlog(center, count: int, origin: str = Delivery.Origin.LIVE) -> None:
    """`count` routine deliveries queued for `center`, of instances indexed without files (a lease reads none)."""
    template = Instance.objects.first()
    instances = Instance.objects.bulk_create(
        [
            Instance(
                sop_instance_uid=f"1.2.826.0.1.3680043.8.498.9{n}",
                sop_class_uid=template.sop_class_uid,
                series=template.series,
                source_center=template.source_center,
                transfer_syntax_uid=template.transfer_syntax_uid,
                file=f"instances/backlog/{n}.dcm",
                size=1,
                sha256="0" * 64,
                routing_key=template.routing_key,
            )
            for n in range(count)
        ]
    )
    Delivery.objects.bulk_create([Delivery(instance=i, center=center, origin=origin) for i in instances])


def test_an_upload_is_routine_by_default(agents):
    assert upload(agents["own"], dicom_bytes("CT")).status_code == 201

    assert Instance.objects.get().priority == Priority.ROUTINE
    assert Delivery.objects.get().priority == Priority.ROUTINE


def test_a_stat_upload_makes_stat_deliveries(agents, network):
    assert upload(agents["own"], dicom_bytes("CT"), "stat").status_code == 201

    assert Instance.objects.get().priority == Priority.STAT
    delivery = Delivery.objects.get()
    assert (delivery.center, delivery.priority) == (network["partner"], Priority.STAT)


def test_routine_may_be_asked_for_by_name(agents):
    assert upload(agents["own"], dicom_bytes("CT"), "routine").status_code == 201

    assert Delivery.objects.get().priority == Priority.ROUTINE


@pytest.mark.parametrize("value", ["STAT", "urgent", "1", " stat"])
def test_it_refuses_an_unknown_priority_with_400_naming_the_allowed_values(agents, storage_dir, value):
    response = upload(agents["own"], dicom_bytes("CT"), value)

    assert response.status_code == 400
    assert response.json() == {"error": f"'priority' must be one of routine, stat, not {value!r}."}
    assert not Instance.objects.exists()
    assert not storage_dir.exists() or not any(p.is_file() for p in storage_dir.rglob("*"))


def test_lease_items_carry_their_priority(agents):
    upload(agents["own"], dicom_bytes("CT", instance_number=1))
    upload(agents["own"], dicom_bytes("CT", instance_number=2), "stat")

    items = agents["partner"].lease(limit=10).json()

    assert [item["priority"] for item in items] == ["stat", "routine"]


def test_a_stat_instance_uploaded_after_2000_routine_ones_is_in_the_next_lease(agents, network):
    upload(agents["own"], dicom_bytes("CT", instance_number=1))
    routine_backlog(network["partner"], 2000)
    stat = dicom_bytes("CT", instance_number=2)
    sop = upload(agents["own"], stat, "stat").json()["sop_instance_uid"]

    items = agents["partner"].lease(limit=10).json()

    assert items[0]["sop_instance_uid"] == sop
    assert items[0]["priority"] == "stat"
    assert [item["priority"] for item in items[1:]] == ["routine"] * 9
    # The routine ones still come oldest first.
    assert [item["id"] for item in items[1:]] == sorted(item["id"] for item in items[1:])


def test_stat_deliveries_are_leased_in_the_order_they_were_queued(agents):
    for n in range(3):
        upload(agents["own"], dicom_bytes("CT", instance_number=n), "stat")

    items = agents["partner"].lease(limit=2).json()

    assert [item["id"] for item in items] == sorted(Delivery.objects.values_list("pk", flat=True))[:2]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's plan")
def test_the_lease_query_reads_the_priority_index(agents, network):
    upload(agents["own"], dicom_bytes("CT"))
    routine_backlog(network["partner"], 3000)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE routing_delivery")
    plans = []
    real_first = delivery_services._first_by_priority

    def explained(available, limit):
        for status in (Delivery.Status.QUEUED, Delivery.Status.LEASED):
            query = available.filter(status=status).order_by(*delivery_services.LEASE_ORDER).values_list("pk")[:limit]
            plans.append(query.explain())
        return real_first(available, limit)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(delivery_services, "_first_by_priority", explained)
        assert len(agents["partner"].lease(limit=50).json()) == 50

    for plan in plans:
        # An ordered walk of the index that stops at the limit: no sort of the backlog.
        assert "Index Scan using delivery_queue_priority" in plan, plan
        assert "Sort" not in plan, plan


def test_a_stat_reupload_raises_what_is_still_owed_to_stat(agents, network):
    data = dicom_bytes("CT")
    upload(agents["own"], data)
    outsider = Delivery.objects.create(
        instance=Instance.objects.get(), center=network["outsider"], status=Delivery.Status.DELIVERED
    )

    again = upload(agents["own"], data, "stat")

    assert again.status_code == 200
    assert Instance.objects.get().priority == Priority.STAT
    assert Delivery.objects.get(center=network["partner"]).priority == Priority.STAT
    # What was delivered already stays as it was.
    outsider.refresh_from_db()
    assert outsider.priority == Priority.ROUTINE
    assert agents["partner"].lease().json()[0]["priority"] == "stat"


def test_a_routine_reupload_never_lowers_a_stat_instance(agents):
    data = dicom_bytes("CT")
    upload(agents["own"], data, "stat")

    assert upload(agents["own"], data).status_code == 200

    assert Instance.objects.get().priority == Priority.STAT
    assert Delivery.objects.get().priority == Priority.STAT


def test_only_the_publisher_raises_its_instance(agents, network):
    data = dicom_bytes("CT")
    upload(agents["own"], data)

    assert upload(agents["outsider"], data, "stat").status_code == 200

    assert Instance.objects.get().priority == Priority.ROUTINE
    assert Delivery.objects.get().priority == Priority.ROUTINE


def test_a_stat_reupload_raises_a_pending_deidentified_copy(agents, network):
    data = dicom_bytes("CT")
    upload(agents["own"], data)
    pending = DeidentifiedCopy.objects.create(original=Instance.objects.get(), center=network["outsider"])

    upload(agents["own"], data, "stat")

    pending.refresh_from_db()
    assert pending.priority == Priority.STAT


def test_stat_fanout_goes_to_the_stat_queue_and_routine_to_the_default_one(agents, settings, monkeypatch):
    queued = []
    monkeypatch.setattr("routing.tasks.route_instance.apply_async", lambda args, queue: queued.append((args[0], queue)))

    upload(agents["own"], dicom_bytes("CT", instance_number=1))
    upload(agents["own"], dicom_bytes("CT", instance_number=2), "stat")

    routine, stat = Instance.objects.order_by("pk")
    assert queued == [(routine.pk, settings.CELERY_TASK_DEFAULT_QUEUE), (stat.pk, settings.CELERY_STAT_QUEUE)]
    assert settings.CELERY_STAT_QUEUE != settings.CELERY_TASK_DEFAULT_QUEUE


def test_the_sweep_queues_unrouted_stat_instances_first_and_to_the_stat_queue(agents, settings, monkeypatch):
    monkeypatch.setattr(services, "_queue_route", lambda instance_id, priority=0: None)
    upload(agents["own"], dicom_bytes("CT", instance_number=1))
    upload(agents["own"], dicom_bytes("CT", instance_number=2), "stat")
    queued = []
    monkeypatch.setattr("routing.tasks.route_instance.apply_async", lambda args, queue: queued.append((args[0], queue)))

    assert services.instances_route_unrouted(older_than=services.timedelta(0)) == 2

    routine, stat = Instance.objects.order_by("pk")
    assert queued == [(stat.pk, settings.CELERY_STAT_QUEUE), (routine.pk, settings.CELERY_TASK_DEFAULT_QUEUE)]


def test_what_is_published_live_is_leased_before_a_backfill_queued_earlier(agents, network):
    upload(agents["own"], dicom_bytes("CT", instance_number=1))
    Delivery.objects.all().delete()
    routine_backlog(network["partner"], 300, origin=Delivery.Origin.BACKFILL)
    assert upload(agents["own"], dicom_bytes("CT", instance_number=2)).status_code == 201
    live = Delivery.objects.get(origin=Delivery.Origin.LIVE)

    first = agents["partner"].lease(limit=5).json()
    assert first[0]["id"] == live.pk
    assert {d.origin for d in Delivery.objects.filter(pk__in=[i["id"] for i in first[1:]])} == {"backfill"}


def test_a_lease_takes_stat_then_live_routine_then_backfill(agents, network):
    routine_upload = upload(agents["own"], dicom_bytes("CT", instance_number=1))
    stat_upload = upload(agents["own"], dicom_bytes("CT", instance_number=2), "stat")
    assert (routine_upload.status_code, stat_upload.status_code) == (201, 201)
    routine_backlog(network["partner"], 20, origin=Delivery.Origin.BACKFILL)

    order = [Delivery.objects.get(pk=i["id"]) for i in agents["partner"].lease(limit=22).json()]
    assert [(d.priority, d.origin) for d in order[:2]] == [(Priority.STAT, "live"), (Priority.ROUTINE, "live")]
    assert {d.origin for d in order[2:]} == {"backfill"}
