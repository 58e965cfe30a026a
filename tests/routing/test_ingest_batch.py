"""POST /api/v1/instances with a multipart/related body: many instances, a result for each."""

import hashlib
import random

import pytest

from centers.models import AuditEvent
from portal.bridge import RECEIVED_BODY
from routing.batch import BatchReceiver
from routing.models import Delivery, Instance, Priority, Series
from tests.dicomfiles import dicom_bytes
from tests.routing.test_ingest import stored_files

pytestmark = pytest.mark.django_db

BOUNDARY = "batch-boundary-1"


def multipart(parts: list[bytes | tuple[str, bytes]], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    body = b""
    for part in parts:
        content_type, data = part if isinstance(part, tuple) else ("application/dicom", part)
        body += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


@pytest.fixture(autouse=True, params=["in the request's thread", "on the event loop"])
def received(request, monkeypatch):
    """Every test runs twice: the view reading the body itself, and the body received as uvicorn hands it over.

    The second is what portal.bridge does with a batch: a BatchReceiver fed the body in the
    pieces the server read, then handed to the view in the environ and discarded after.
    """
    monkeypatch.setitem(globals(), "RECEIVE_ON_LOOP", request.param == "on the event loop")


RECEIVE_ON_LOOP = False


def upload_batch(agent, parts, *, query: str = "", **kwargs):
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    body = multipart(parts, **kwargs)
    extra = {}
    if RECEIVE_ON_LOOP:
        receiver = BatchReceiver(BOUNDARY)
        pieces = random.Random(len(body))
        while body:
            size = pieces.choice([1, 7, 4096, 65536, 262144])
            receiver.feed(body[:size])
            body = body[size:]
        receiver.close()
        extra[RECEIVED_BODY] = receiver
    try:
        with agent.on_commit(execute=True):
            return agent.client.post(
                f"/api/v1/instances{query}",
                data=body,
                content_type=content_type,
                CONTENT_TYPE=content_type,
                **extra,
                **agent.auth,
            )
    finally:
        if RECEIVE_ON_LOOP:
            extra[RECEIVED_BODY].discard()


@pytest.fixture
def queued(monkeypatch):
    """The route_instances messages sent, instead of running them."""
    from routing import tasks

    sent = []
    monkeypatch.setattr(tasks.route_instances, "apply_async", lambda args, queue: sent.append(args[0]))
    return sent


def series_files(count: int, **identity) -> list[bytes]:
    return [
        dicom_bytes("CT", study_uid="1.2.3.9", series_uid="1.2.3.9.1", instance_number=n, **identity)
        for n in range(1, count + 1)
    ]


def test_a_batch_is_stored_indexed_and_answered_part_by_part(agents, storage_dir, network):
    files = series_files(3)
    response = upload_batch(agents["own"], files)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 201, 201]
    for data, result in zip(files, results, strict=True):
        instance = Instance.objects.get(sop_instance_uid=result["sop_instance_uid"])
        assert result["sha256"] == hashlib.sha256(data).hexdigest() == instance.sha256
        assert result["routing_key"] == "fars.shiraz.ct"
        assert (instance.size, instance.source_center) == (len(data), network["own"])
    assert Series.objects.count() == 1
    assert sorted(p.read_bytes() for p in stored_files(storage_dir)) == sorted(files)
    # Routed on commit, like a single upload: the partner subscribed to fars.# has each one.
    assert Delivery.objects.filter(center=network["partner"]).count() == 3
    assert Instance.objects.filter(routed_at__isnull=True).count() == 0


def test_each_part_keeps_its_own_answer_and_a_bad_part_fails_no_other(agents, storage_dir):
    stored = dicom_bytes("CT", sop_uid="1.2.826.0.1.3680043.8.498.7", patient_name="First^Version")
    assert agents["own"].upload(stored).status_code == 201
    conflicting = dicom_bytes("CT", sop_uid="1.2.826.0.1.3680043.8.498.7", patient_name="Second^Version")
    good = dicom_bytes("CT", instance_number=5)
    parts = [
        good,
        b"just some text, not an image" * 20,
        stored,
        conflicting,
        ("text/plain", b"hello"),
        good,
        good[:-1000],
    ]
    results = upload_batch(agents["own"], parts).json()["results"]
    assert [r["status"] for r in results] == [201, 400, 200, 409, 415, 200, 400]
    assert "not a DICOM Part-10 file" in results[1]["error"]
    assert results[2]["sop_instance_uid"] == "1.2.826.0.1.3680043.8.498.7"
    assert "different content" in results[3]["error"]
    assert {**results[5], "status": 201} == results[0]
    assert "truncated" in results[6]["error"]
    # Stored once each: the earlier single upload and the good part.
    assert Instance.objects.count() == 2
    assert sorted(p.read_bytes() for p in stored_files(storage_dir)) == sorted([stored, good])


def test_a_part_over_the_size_limit_is_413_and_the_others_are_stored(agents, settings, storage_dir):
    small = dicom_bytes("CT", instance_number=1)
    large = dicom_bytes("CT", instance_number=2) + bytes(4096)
    settings.DICOM_MAX_UPLOAD_BYTES = len(small)
    results = upload_batch(agents["own"], [large, small]).json()["results"]
    assert [r["status"] for r in results] == [413, 201]
    assert "limit" in results[0]["error"]
    assert [p.read_bytes() for p in stored_files(storage_dir)] == [small]


def test_a_part_naming_a_series_of_another_study_fails_alone(agents, storage_dir):
    agents["own"].upload(dicom_bytes("CT", study_uid="1.2.3.1", series_uid="1.2.3.1.1"))
    intruder = dicom_bytes("CT", study_uid="1.2.3.2", series_uid="1.2.3.1.1", instance_number=2)
    fine = dicom_bytes("CT", study_uid="1.2.3.3", series_uid="1.2.3.3.1", instance_number=3)
    results = upload_batch(agents["own"], [intruder, fine]).json()["results"]
    assert [r["status"] for r in results] == [400, 201]
    assert "another study" in results[0]["error"]
    assert len(stored_files(storage_dir)) == 2


def test_a_broken_body_keeps_nothing(agents, storage_dir):
    response = upload_batch(agents["own"], series_files(3), close=False)
    assert response.status_code == 400
    assert "closing boundary" in response.json()["error"]
    assert stored_files(storage_dir) == []
    assert Instance.objects.count() == 0
    assert not AuditEvent.objects.filter(action__startswith="instance.").exists()


def test_a_failed_database_write_leaves_no_file_of_the_batch(agents, storage_dir, monkeypatch):
    from routing import batch

    def broken_index(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(batch, "_index", broken_index)
    with pytest.raises(RuntimeError):
        upload_batch(agents["own"], series_files(3))
    assert stored_files(storage_dir) == []
    assert Instance.objects.count() == 0


def test_a_batch_is_audited_in_one_insert_a_row_per_instance(agents, network, django_assert_max_num_queries):
    files = series_files(4)
    agents["own"].upload(files[0])
    AuditEvent.objects.all().delete()
    response = upload_batch(agents["own"], files)
    assert [r["status"] for r in response.json()["results"]] == [200, 201, 201, 201]
    events = AuditEvent.objects.filter(center=network["own"])
    assert sorted(e.action for e in events) == ["instance.publish"] * 3 + ["instance.republish"]
    assert {e.object_id for e in events} == {str(pk) for pk in Instance.objects.values_list("pk", flat=True)}
    assert {e.address for e in events} == {"127.0.0.1"}


def test_a_batch_costs_the_same_few_queries_whatever_its_size(agents, queued):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    upload_batch(agents["own"], series_files(1, patient_id="P-WARM"))  # the series exists from here on
    counts = []
    for size in (2, 30):
        files = [
            dicom_bytes("CT", study_uid="1.2.3.9", series_uid="1.2.3.9.1", instance_number=100 + n + size)
            for n in range(size)
        ]
        with CaptureQueriesContext(connection) as captured:
            upload_batch(agents["own"], files)
        counts.append(len(captured))
    assert counts[0] == counts[1]


def test_the_batch_goes_to_the_worker_as_one_message(agents, queued):
    results = upload_batch(agents["own"], series_files(5)).json()["results"]
    assert [r["status"] for r in results] == [201] * 5
    assert queued == [sorted(Instance.objects.values_list("pk", flat=True))]


def test_an_all_duplicate_batch_queues_no_fanout(agents, queued):
    files = series_files(2)
    upload_batch(agents["own"], files)
    upload_batch(agents["own"], files)
    assert len(queued) == 1


def test_priority_stat_reaches_the_instances_and_their_deliveries(agents, network):
    upload_batch(agents["own"], series_files(2), query="?priority=stat")
    assert set(Instance.objects.values_list("priority", flat=True)) == {Priority.STAT}
    assert set(Delivery.objects.values_list("priority", flat=True)) == {Priority.STAT}


def test_an_unknown_priority_is_refused_before_anything_is_stored(agents, storage_dir):
    response = upload_batch(agents["own"], series_files(1), query="?priority=urgent")
    assert response.status_code == 400
    assert stored_files(storage_dir) == []


def test_a_multipart_of_another_type_is_refused_with_415(agents):
    content_type = f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'
    response = agents["own"].client.post(
        "/api/v1/instances", data=multipart([b"{}"]), content_type=content_type, **agents["own"].auth
    )
    assert response.status_code == 415


def test_the_batch_fanout_writes_what_the_single_fanout_writes(agents, network, queued):
    from routing import services
    from routing.batch import instances_route

    batch_files = series_files(3)
    single_file = dicom_bytes("CT", instance_number=9)
    upload_batch(agents["own"], batch_files)
    with agents["own"].on_commit(execute=True):
        agents["own"].upload(single_file)
    single = Instance.objects.get(sha256=hashlib.sha256(single_file).hexdigest())
    assert services.instance_route(instance_id=single.pk) is None  # routed at its commit
    [ids] = queued
    assert instances_route(instance_ids=ids) == 3
    assert instances_route(instance_ids=ids) == 0  # routed already: nothing twice

    def shape(instance):
        return sorted(
            Delivery.objects.filter(instance=instance).values_list("center_id", "priority", "origin", "whole_study")
        )

    assert {tuple(shape(i)) for i in Instance.objects.all()} == {tuple(shape(single))}
    assert shape(single) == [(network["partner"].pk, Priority.ROUTINE, Delivery.Origin.LIVE, False)]


def test_an_instance_the_batch_cannot_route_goes_to_its_own_task_and_the_others_are_routed(
    agents, network, queued, monkeypatch, django_capture_on_commit_callbacks
):
    from routing import tasks
    from routing.batch import instances_route

    upload_batch(agents["own"], series_files(3))
    [ids] = queued
    bad = Instance.objects.get(pk=ids[1])
    Instance.objects.filter(pk=bad.pk).update(routing_key="fars.shiraz.CT?")
    alone = []
    monkeypatch.setattr(tasks.route_instance, "delay", alone.append)
    with django_capture_on_commit_callbacks(execute=True):
        assert instances_route(instance_ids=ids) == 2
    assert alone == [bad.pk]
    assert not Delivery.objects.filter(instance=bad).exists()
    assert Instance.objects.get(pk=bad.pk).routed_at is None
    assert Delivery.objects.filter(instance_id__in=[ids[0], ids[2]], center=network["partner"]).count() == 2


def test_a_stat_batch_raises_a_stored_instance_to_stat_as_a_single_upload_does(agents, network):
    stored, new = series_files(2)
    assert agents["own"].upload(stored).status_code == 201
    response = upload_batch(agents["own"], [stored, new], query="?priority=stat")
    assert [r["status"] for r in response.json()["results"]] == [200, 201]
    assert set(Instance.objects.values_list("priority", flat=True)) == {Priority.STAT}
    assert set(Delivery.objects.values_list("priority", flat=True)) == {Priority.STAT}
    assert AuditEvent.objects.get(action="instance.republish").detail == {"raised_to_stat": 1}


def test_a_body_that_failed_on_the_event_loop_is_not_parsed_any_further(storage_dir, monkeypatch):
    receiver = BatchReceiver(BOUNDARY)
    receiver.feed(multipart(series_files(1), close=False) + b"--" + BOUNDARY.encode() + b"\r\nNo colon here\r\n\r\n")
    assert "no ':'" in str(receiver.failure)
    parsed = []
    monkeypatch.setattr(receiver.parser, "feed", lambda chunk: parsed.append(chunk) or [])
    monkeypatch.setattr(receiver.parser, "close", lambda: parsed.append(b"") or [])
    receiver.feed(multipart(series_files(3)))
    receiver.close()
    assert parsed == []
    assert stored_files(storage_dir) == []
