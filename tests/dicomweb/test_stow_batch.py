"""STOW-RS stores a request's instances as one batch (routing.batch), with each part's own PS3.18 answer."""

import hashlib
import json

import pytest
from celery.signals import task_prerun
from django.db import DatabaseError, connection
from django.test.utils import CaptureQueriesContext

from centers.models import AuditEvent
from routing.models import Delivery, Instance, Priority
from tests.dicomfiles import dicom_bytes
from tests.dicomweb.conftest import BOUNDARY, stow_body, stow_type, values
from tests.routing.test_ingest import stored_files

STUDY = "1.2.826.0.1.3680043.8.498.3003"
SERIES = f"{STUDY}.1"


def series_files(count: int, first: int = 1) -> list[bytes]:
    return [
        dicom_bytes("CT", study_uid=STUDY, series_uid=SERIES, instance_number=n) for n in range(first, first + count)
    ]


@pytest.fixture
def routed():
    """The fan-out tasks run for the requests (Celery runs them in the test process)."""
    runs = []

    def record(sender=None, args=None, **kwargs):
        runs.append((sender.name, list(args)))

    task_prerun.connect(record, weak=False)
    yield runs
    task_prerun.disconnect(record)


def answers(response) -> tuple[list[str], list[tuple[str | None, int]]]:
    """The stored SOP Instance UIDs and the (SOP Instance UID, failure reason) of each failed part, in order."""
    body = json.loads(response.content)
    stored = [values(item, "00081155")[0] for item in values(body, "00081199")]
    failed = [
        (next(iter(values(item, "00081155")), None), values(item, "00081197")[0]) for item in values(body, "00081198")
    ]
    return stored, failed


def test_a_stow_costs_the_same_queries_for_2_and_for_30_parts(web):
    assert web["own"].stow(*series_files(1)).status_code == 200  # the series exists from here on
    counts = []
    for first, size in ((10, 2), (20, 30)):
        body = stow_body(*series_files(size, first))
        with CaptureQueriesContext(connection) as captured:
            # The fan-out queued at commit is left out: the worker's cost, not the request's.
            response = web["own"].client.post(
                "/dicomweb/studies", data=body, content_type=stow_type(), CONTENT_TYPE=stow_type(), **web["own"].auth
            )
        assert response.status_code == 200, response.content
        counts.append(len(captured))
    assert counts[0] == counts[1]


def test_a_stow_request_goes_to_the_worker_as_one_message_and_is_routed(web, network, routed):
    response = web["own"].stow(*series_files(5))
    assert response.status_code == 200, response.content
    stored = sorted(Instance.objects.values_list("pk", flat=True))
    assert routed == [("routing.tasks.route_instances", [stored])]
    assert Delivery.objects.filter(center=network["partner"]).count() == 5


def test_a_stow_past_the_batch_limit_is_stored_whole_in_batches(web, routed, monkeypatch):
    from routing import batch

    monkeypatch.setattr(batch, "MAX_PARTS", 2)
    files = series_files(5)
    response = web["own"].stow(*files)
    assert response.status_code == 200, response.content
    assert len(answers(response)[0]) == 5
    assert Instance.objects.count() == 5
    assert [len(ids) for _, [ids] in routed] == [2, 2, 1]


def test_mixed_parts_keep_the_answers_each_had_when_stored_one_by_one(web, settings, storage_dir):
    stored = dicom_bytes("CT", study_uid=STUDY, sop_uid=f"{STUDY}.7", patient_name="First^Version")
    assert web["own"].stow(stored).status_code == 200
    conflicting = dicom_bytes("CT", study_uid=STUDY, sop_uid=f"{STUDY}.7", patient_name="Second^Version")
    good = dicom_bytes("CT", study_uid=STUDY, sop_uid=f"{STUDY}.8", instance_number=8)
    stranger = dicom_bytes("CT", study_uid="1.2.3.4.5", sop_uid="1.2.3.4.5.6")
    large = dicom_bytes("CT", study_uid=STUDY, sop_uid=f"{STUDY}.9") + bytes(64 * 1024)
    settings.DICOM_MAX_UPLOAD_BYTES = len(large) - 1
    parts = [good, b"not DICOM at all" * 20, stored, conflicting, stranger, large, good, good[:-1000]]
    body = stow_body(*parts)
    body = body.replace(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nnot DICOM".encode(),
        f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nnot DICOM".encode(),
    )
    response = web["own"].stow(body=body, study=STUDY)
    assert response.status_code == 202
    assert answers(response) == (
        [f"{STUDY}.8", f"{STUDY}.7", f"{STUDY}.8"],
        [(None, 0xC000), (f"{STUDY}.7", 0x0111), ("1.2.3.4.5.6", 0xA900), (None, 0xA700), (None, 0xC000)],
    )
    assert values(json.loads(response.content), "00081196") == [0xB000]
    assert "different content" in response["Warning"] and "belongs to study 1.2.3.4.5" in response["Warning"]
    # Stored once each: the earlier upload and the good part.
    assert sorted(p.read_bytes() for p in stored_files(storage_dir)) == sorted([stored, good])
    events = AuditEvent.objects.filter(action__startswith="instance.").order_by("pk")
    assert [e.action for e in events] == ["instance.publish"] * 2 + ["instance.republish"] * 2


def test_a_body_cut_short_keeps_the_parts_before_and_refuses_the_cut_one(web, storage_dir):
    files = series_files(3)
    body = stow_body(*files[:2]).removesuffix(f"--{BOUNDARY}--\r\n".encode())
    body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + files[2][:800]
    response = web["own"].stow(body=body)
    assert response.status_code == 202
    stored, failed = answers(response)
    assert len(stored) == 2 and failed == [(None, 0xC000)]
    assert "closing boundary" in response["Warning"]
    assert sorted(p.read_bytes() for p in stored_files(storage_dir)) == sorted(files[:2])


def test_a_failed_database_write_leaves_no_file_row_or_audit_of_the_request(web, storage_dir):
    with connection.cursor() as cursor:
        # A real failure inside the batch's transaction: PostgreSQL refuses the instance rows.
        cursor.execute(
            "CREATE FUNCTION refuse_instance() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$"
        )
        cursor.execute(
            f"CREATE TRIGGER refuse_instance BEFORE INSERT ON {Instance._meta.db_table} "
            "FOR EACH ROW EXECUTE FUNCTION refuse_instance()"
        )
    with pytest.raises(DatabaseError):
        web["own"].stow(*series_files(3))
    assert stored_files(storage_dir) == []
    assert not Instance.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="instance.").exists()


def test_a_stat_stow_of_a_stored_instance_raises_it_and_its_deliveries_to_stat(web, network):
    [ct] = series_files(1)
    assert web["own"].stow(ct).status_code == 200
    assert Delivery.objects.get(center=network["partner"]).priority == Priority.ROUTINE
    with web["own"].on_commit(execute=True):
        response = web["own"].client.post(
            "/dicomweb/studies?priority=stat",
            data=stow_body(ct),
            content_type=stow_type(),
            CONTENT_TYPE=stow_type(),
            **web["own"].auth,
        )
    assert response.status_code == 200, response.content
    assert Instance.objects.get(sha256=hashlib.sha256(ct).hexdigest()).priority == Priority.STAT
    assert Delivery.objects.get(center=network["partner"]).priority == Priority.STAT
    event = AuditEvent.objects.get(action="instance.republish")
    assert event.detail == {"raised_to_stat": 1}
