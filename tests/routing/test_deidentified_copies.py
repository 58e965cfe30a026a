"""A `deidentify: basic` subscriber receives copies, made once, and nothing of the original identity.

Through the real ingest API and fan-out (eager tasks), then the recipient's lease,
file, DICOMweb and clinician pages, and the publisher's own pages.
"""

import hashlib
import io
import json
from datetime import timedelta

import pydicom
import pytest
from django.db.models import F
from django.test import Client
from pydicom.uid import generate_uid

from centers.models import AuditEvent, Membership
from routing import deidentification_services
from routing.models import DeidentifiedCopy, Delivery, Instance, Pseudonym, Study, Subscription
from tests.dicomfiles import dicom_bytes

pytestmark = pytest.mark.django_db

NAME, PATIENT_ID, DESCRIPTION = "Rostami^Sara", "PAT-777", "Head trauma after fall"


@pytest.fixture
def deidentifying(network):
    """The partner takes Fars de-identified; the outsider (#.nm) still takes its images as published."""
    Subscription.objects.filter(center=network["partner"]).update(deidentify=Subscription.Deidentify.BASIC)
    return network


def upload(agents, **attributes) -> bytes:
    data = dicom_bytes(
        attributes.pop("modality", "CT"),
        patient_name=NAME,
        patient_id=attributes.pop("patient_id", PATIENT_ID),
        StudyDescription=DESCRIPTION,
        **attributes,
    )
    response = agents["own"].upload(data)
    assert response.status_code == 201, response.content
    return data


def identity_of(data: bytes) -> list[bytes]:
    ds = pydicom.dcmread(io.BytesIO(data))
    return [
        b"Rostami",
        PATIENT_ID.encode(),
        DESCRIPTION.encode(),
        ds.StudyInstanceUID.encode(),
        ds.SeriesInstanceUID.encode(),
        ds.SOPInstanceUID.encode(),
    ]


def assert_no_identity(content: bytes, originals: list[bytes]) -> None:
    for value in originals:
        assert value not in content, value
    # The UI and DICOM JSON spell the name their own ways.
    assert b"rostami" not in content.lower()


def test_it_delivers_a_de_identified_copy_whose_sha256_is_the_downloaded_bytes(agents, deidentifying):
    original = upload(agents)
    copy = DeidentifiedCopy.objects.select_related("copy", "original").get()
    assert copy.status == DeidentifiedCopy.Status.MADE
    assert copy.center == deidentifying["partner"]
    assert copy.copy.derived_from == copy.original and copy.copy.derived_for == deidentifying["partner"]
    assert Delivery.objects.get(center=deidentifying["partner"]).instance == copy.copy
    assert not Delivery.objects.filter(instance=copy.original).exists()

    [item] = agents["partner"].lease(limit=10).json()
    body = b"".join(agents["partner"].file(item["id"]).streaming_content)
    assert hashlib.sha256(body).hexdigest() == item["sha256"] == copy.copy.sha256
    ds = pydicom.dcmread(io.BytesIO(body))
    assert item["patient_id"] == ds.PatientID != PATIENT_ID
    assert item["study_instance_uid"] == ds.StudyInstanceUID
    assert item["series_instance_uid"] == ds.SeriesInstanceUID
    assert item["sop_instance_uid"] == ds.SOPInstanceUID
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.PixelData == pydicom.dcmread(io.BytesIO(original)).PixelData
    assert_no_identity(json.dumps(item).encode() + body, identity_of(original))
    assert agents["partner"].ack(item["id"], item["sha256"]).status_code == 200


def test_dicomweb_shows_the_recipient_only_the_copy(agents, deidentifying):
    original = upload(agents)
    source = pydicom.dcmread(io.BytesIO(original))
    made = Instance.objects.get(derived_for=deidentifying["partner"])
    study, series = made.series.study.study_instance_uid, made.series.series_instance_uid
    partner = agents["partner"]

    def get(path, **params):
        return partner.client.get(path, params, **partner.auth)

    seen = b""
    for path in ("/dicomweb/studies", "/dicomweb/series", "/dicomweb/instances"):
        response = get(path, includefield="all")
        assert response.status_code == 200
        assert study.encode() in response.content
        seen += response.content
    for path in (
        f"/dicomweb/studies/{study}/metadata",
        f"/dicomweb/studies/{study}/series/{series}/instances/{made.sop_instance_uid}",
    ):
        response = get(path)
        assert response.status_code == 200, path
        seen += b"".join(response.streaming_content) if response.streaming else response.content
    assert_no_identity(seen, identity_of(original))
    assert get("/dicomweb/studies", PatientName="Rostami*").content == b"[]"
    assert get(f"/dicomweb/studies/{source.StudyInstanceUID}").status_code == 404
    assert get(f"/dicomweb/studies/{source.StudyInstanceUID}/metadata").status_code == 404


def test_the_clinician_pages_show_the_recipient_only_the_copy(agents, deidentifying, django_user_model):
    original = upload(agents)
    source = pydicom.dcmread(io.BytesIO(original))
    made = Instance.objects.select_related("series__study").get(derived_for=deidentifying["partner"])
    user = django_user_model.objects.create_user("dr-partner", password="a long password")
    Membership.objects.create(user=user, center=deidentifying["partner"])
    browser = Client()
    browser.force_login(user)
    pages = b""
    for path in (
        "/received/",
        f"/studies/{made.series.study.study_instance_uid}/",
        f"/series/{made.series.series_instance_uid}/",
    ):
        response = browser.get(path)
        assert response.status_code == 200, path
        pages += response.content
    assert made.series.study.study_instance_uid.encode() in pages
    assert_no_identity(pages, identity_of(original))
    assert browser.get(f"/studies/{source.StudyInstanceUID}/").status_code == 404
    assert browser.get("/received/", {"q": PATIENT_ID}).content.count(b"data-study-uid") == 0


def test_the_publisher_sees_its_study_once_with_the_copy_s_delivery(agents, deidentifying, django_user_model):
    original = upload(agents)
    source = pydicom.dcmread(io.BytesIO(original))
    user = django_user_model.objects.create_user("dr-own", password="a long password")
    Membership.objects.create(user=user, center=deidentifying["own"])
    browser = Client()
    browser.force_login(user)
    sent = browser.get("/sent/").content.decode()
    assert sent.count("data-study-uid=") == 1
    assert source.StudyInstanceUID in sent
    assert "Tehran Hospital" in sent and "0/1 delivered" in sent
    own = agents["own"]
    studies = json.loads(own.client.get("/dicomweb/studies", **own.auth).content)
    assert [s["0020000D"]["Value"] for s in studies] == [[source.StudyInstanceUID]]
    copy_uid = Study.objects.get(derived_for__isnull=False).study_instance_uid
    assert own.client.get(f"/dicomweb/studies/{copy_uid}", **own.auth).status_code == 404
    assert browser.get(f"/studies/{copy_uid}/").status_code == 404


def test_two_studies_of_one_patient_keep_one_pseudonymous_patient(agents, deidentifying):
    upload(agents, study_uid=generate_uid())
    upload(agents, study_uid=generate_uid())
    copies = Study.objects.filter(derived_for=deidentifying["partner"]).select_related("patient")
    assert copies.count() == 2
    assert len({study.patient_id for study in copies}) == 1
    assert copies[0].patient.patient_id != PATIENT_ID


def test_a_study_uploaded_over_two_days_stays_one_study_at_the_recipient(agents, deidentifying):
    study_uid, series_uid = generate_uid(), generate_uid()
    upload(agents, study_uid=study_uid, series_uid=series_uid, instance_number=1)
    # The first day's instance and copy are long done when the second arrives.
    Instance.objects.update(received_at=F("received_at") - timedelta(days=1))
    DeidentifiedCopy.objects.update(created_at=F("created_at") - timedelta(days=1))
    upload(agents, study_uid=study_uid, series_uid=series_uid, instance_number=2)
    copies = Instance.objects.filter(derived_for=deidentifying["partner"]).select_related("series__study")
    assert copies.count() == 2
    assert len({i.series.study.study_instance_uid for i in copies}) == 1
    assert len({i.series_id for i in copies}) == 1
    [item_one, item_two] = agents["partner"].lease(limit=10).json()
    assert item_one["study_instance_uid"] == item_two["study_instance_uid"] != study_uid


def test_an_instance_with_burned_in_annotation_is_held_with_its_reason(agents, deidentifying, django_user_model):
    upload(agents, BurnedInAnnotation="YES")
    copy = DeidentifiedCopy.objects.get()
    assert copy.status == DeidentifiedCopy.Status.HELD
    assert "Burned In Annotation" in copy.reason
    assert copy.copy is None
    assert not Delivery.objects.filter(center=deidentifying["partner"]).exists()
    assert agents["partner"].lease(limit=10).json() == []
    assert AuditEvent.objects.filter(action="instance.deidentify_hold").count() == 1
    user = django_user_model.objects.create_user("dr-own", password="a long password")
    Membership.objects.create(user=user, center=deidentifying["own"])
    browser = Client()
    browser.force_login(user)
    sent = browser.get("/sent/").content.decode()
    assert "held" in sent and "Burned In Annotation is YES" in sent


def test_a_center_without_deidentify_still_gets_the_original(agents, deidentifying):
    data = upload(agents, modality="NM")
    [item] = agents["outsider"].lease(limit=10).json()
    assert item["sha256"] == hashlib.sha256(data).hexdigest()
    assert item["patient_id"] == PATIENT_ID


def test_the_copy_is_made_once(agents, deidentifying, storage_dir):
    upload(agents)
    copy = DeidentifiedCopy.objects.get()
    files = sorted(storage_dir.rglob("*.dcm"))
    assert deidentification_services.deidentified_copy_make(copy_id=copy.pk) is None
    assert sorted(storage_dir.rglob("*.dcm")) == files
    assert Instance.objects.filter(derived_from__isnull=False).count() == 1
    assert AuditEvent.objects.filter(action="instance.deidentify").count() == 1


def test_it_records_the_pseudonyms_for_the_publisher(agents, deidentifying):
    original = pydicom.dcmread(io.BytesIO(upload(agents)))
    made = Instance.objects.select_related("series__study__patient").get(derived_for__isnull=False)
    mapping = {
        (p.kind, p.original): p.pseudonym
        for p in Pseudonym.objects.filter(publisher=deidentifying["own"], recipient=deidentifying["partner"])
    }
    assert mapping == {
        ("patient", PATIENT_ID): made.series.study.patient.patient_id,
        ("study", original.StudyInstanceUID): made.series.study.study_instance_uid,
        ("series", original.SeriesInstanceUID): made.series.series_instance_uid,
        ("instance", original.SOPInstanceUID): made.sop_instance_uid,
    }


def test_the_sweep_makes_a_copy_whose_task_was_lost(agents, deidentifying, monkeypatch):
    # The broker lost the task queued at the fan-out's commit.
    monkeypatch.setattr("routing.fanout._queue_deidentify", lambda copy_id: None)
    upload(agents)
    copy = DeidentifiedCopy.objects.get()
    assert copy.status == DeidentifiedCopy.Status.PENDING
    assert deidentification_services.deidentified_copies_queue_pending(older_than=timedelta(minutes=5)) == 0
    assert deidentification_services.deidentified_copies_queue_pending(older_than=timedelta(0)) == 1
    copy.refresh_from_db()
    assert copy.status == DeidentifiedCopy.Status.MADE
    assert Delivery.objects.filter(center=deidentifying["partner"], instance=copy.copy).exists()


def test_run_periodic_runs_the_sweep_of_pending_copies(agents, deidentifying, monkeypatch, settings):
    from django.core.management import call_command

    monkeypatch.setattr("routing.fanout._queue_deidentify", lambda copy_id: None)
    upload(agents)
    settings.SWEEP_GRACE_SECONDS = 0
    monkeypatch.setattr("routing.tasks.settings.SWEEP_GRACE_SECONDS", 0)
    call_command("run_periodic", "--once")
    assert DeidentifiedCopy.objects.get().status == DeidentifiedCopy.Status.MADE


def test_a_missing_original_fails_the_copy_with_its_reason(agents, deidentifying, monkeypatch, storage_dir):
    monkeypatch.setattr("routing.fanout._queue_deidentify", lambda copy_id: None)
    upload(agents)
    for path in storage_dir.rglob("*.dcm"):
        path.unlink()
    copy = DeidentifiedCopy.objects.get()
    assert deidentification_services.deidentified_copy_make(copy_id=copy.pk) == DeidentifiedCopy.Status.FAILED
    copy.refresh_from_db()
    assert copy.reason == deidentification_services.MISSING_ORIGINAL_REASON


def test_the_publisher_s_dashboard_counts_its_upload_once(agents, deidentifying):
    from studies.selectors import center_dashboard

    upload(agents)
    dashboard = center_dashboard(center=deidentifying["own"])
    assert sum(bucket.sent_count for bucket in dashboard.daily) == 1
    assert dashboard.outgoing["queued"] == 1, "the copy's delivery is the publisher's outgoing delivery"
    assert sum(bucket.received_count for bucket in center_dashboard(center=deidentifying["partner"]).daily) == 1


def test_the_held_copies_of_a_publisher_are_listed_for_its_pages(agents, deidentifying):
    from routing.selectors import deidentified_copies_held

    upload(agents, BurnedInAnnotation="YES")
    upload(agents)
    [held] = deidentified_copies_held(center=deidentifying["own"])
    assert held.center == deidentifying["partner"] and "Burned In Annotation" in held.reason
    assert list(deidentified_copies_held(center=deidentifying["partner"])) == []


def test_a_storage_error_leaves_the_copy_pending_for_a_retry(agents, deidentifying, monkeypatch):
    monkeypatch.setattr("routing.fanout._queue_deidentify", lambda copy_id: None)
    upload(agents)

    def unreachable(instance):
        raise OSError("the bucket did not answer")

    monkeypatch.setattr("routing.deidentification_services.instance_open", unreachable)
    copy = DeidentifiedCopy.objects.get()
    with pytest.raises(OSError):
        deidentification_services.deidentified_copy_make(copy_id=copy.pk)
    copy.refresh_from_db()
    assert copy.status == DeidentifiedCopy.Status.PENDING


def test_a_file_pydicom_cannot_read_fails_the_copy_with_its_reason(agents, deidentifying, monkeypatch, storage_dir):
    monkeypatch.setattr("routing.fanout._queue_deidentify", lambda copy_id: None)
    upload(agents)
    [path] = storage_dir.rglob("*.dcm")
    path.write_bytes(b"not DICOM at all")
    copy = DeidentifiedCopy.objects.get()
    assert deidentification_services.deidentified_copy_make(copy_id=copy.pk) == DeidentifiedCopy.Status.FAILED
    copy.refresh_from_db()
    assert copy.reason.startswith("cannot be de-identified")
    assert sorted(storage_dir.rglob("*.dcm")) == [path], "no copy stored"


def test_a_failed_transaction_leaves_no_stored_copy(agents, deidentifying, monkeypatch, storage_dir):
    monkeypatch.setattr("routing.fanout._queue_deidentify", lambda copy_id: None)
    upload(agents)
    files = sorted(storage_dir.rglob("*.dcm"))

    def broken(**kwargs):
        raise RuntimeError("the audit log refused the row")

    monkeypatch.setattr("routing.deidentification_services.audit_record", broken)
    copy = DeidentifiedCopy.objects.get()
    with pytest.raises(RuntimeError):
        deidentification_services.deidentified_copy_make(copy_id=copy.pk)
    assert sorted(storage_dir.rglob("*.dcm")) == files
    copy.refresh_from_db()
    assert copy.status == DeidentifiedCopy.Status.PENDING
    assert not Instance.objects.filter(derived_from__isnull=False).exists()


def test_an_upload_into_a_copys_study_is_refused_and_the_copy_stays_whole(agents, deidentifying):
    upload(agents)
    copy_study = DeidentifiedCopy.objects.select_related("copy__series__study").get().copy.series.study
    # The outsider learns nothing of the copy; a publisher reusing the UID must not graft onto it.
    data = dicom_bytes("CT", study_uid=copy_study.study_instance_uid, patient_id="OTHER")
    response = agents["outsider"].upload(data)
    assert response.status_code == 400
    assert "another study" in response.json()["error"]
    assert copy_study.series.count() == 1


def test_an_upload_into_a_copys_series_is_refused(agents, deidentifying):
    upload(agents)
    series = DeidentifiedCopy.objects.select_related("copy__series__study").get().copy.series
    data = dicom_bytes(
        "CT", study_uid=series.study.study_instance_uid, series_uid=series.series_instance_uid, patient_id="OTHER"
    )
    response = agents["outsider"].upload(data)
    assert response.status_code == 400
    assert series.instances.count() == 1
