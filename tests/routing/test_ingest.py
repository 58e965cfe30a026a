"""POST /api/v1/instances: every answer of the contract."""

import hashlib

import pytest

from routing.models import Delivery, Instance, Patient, Series, Study
from tests.dicomfiles import dicom_bytes

pytestmark = pytest.mark.django_db


def stored_files(storage_dir):
    return [p for p in storage_dir.rglob("*") if p.is_file()] if storage_dir.exists() else []


def test_it_stores_a_new_instance_and_answers_201(agents, ct_file, storage_dir):
    response = agents["own"].upload(ct_file)
    assert response.status_code == 201
    body = response.json()
    instance = Instance.objects.get()
    assert body == {
        "sop_instance_uid": instance.sop_instance_uid,
        "study_instance_uid": instance.series.study.study_instance_uid,
        "series_instance_uid": instance.series.series_instance_uid,
        "routing_key": "fars.shiraz.ct",
        "sha256": hashlib.sha256(ct_file).hexdigest(),
        "size": len(ct_file),
    }
    [path] = stored_files(storage_dir)
    assert path.read_bytes() == ct_file


def test_it_indexes_patient_study_and_series(agents, network):
    agents["own"].upload(dicom_bytes("CT", patient_id="P-77", patient_name="Rostami^Ali"))
    patient = Patient.objects.get()
    assert (patient.patient_id, patient.name, patient.center) == ("P-77", "Rostami^Ali", network["own"])
    assert Study.objects.get().source_center == network["own"]
    assert Series.objects.get().modality == "CT"


def test_it_answers_200_to_the_same_bytes_again_without_a_second_fanout(agents, ct_file, storage_dir):
    first = agents["own"].upload(ct_file)
    again = agents["own"].upload(ct_file)
    assert again.status_code == 200
    assert again.json() == first.json()
    assert Instance.objects.count() == 1
    assert Delivery.objects.count() == 1
    assert len(stored_files(storage_dir)) == 1


def test_it_answers_409_to_the_same_uid_with_other_bytes(agents, storage_dir):
    agents["own"].upload(dicom_bytes("CT", sop_uid="1.2.826.0.1.3680043.8.498.1", patient_name="First^Version"))
    response = agents["own"].upload(
        dicom_bytes("CT", sop_uid="1.2.826.0.1.3680043.8.498.1", patient_name="Second^Version")
    )
    assert response.status_code == 409
    assert "different content" in response.json()["error"]
    assert len(stored_files(storage_dir)) == 1


@pytest.mark.parametrize(
    "body, complaint",
    [
        (b"just some text, not an image" * 20, "not a DICOM Part-10 file"),
        (b"", "empty"),
    ],
)
def test_it_rejects_what_is_not_dicom_with_400(agents, storage_dir, body, complaint):
    response = agents["own"].upload(body)
    assert response.status_code == 400
    assert complaint in response.json()["error"]
    assert stored_files(storage_dir) == []


def test_it_rejects_a_truncated_file(agents, ct_file, storage_dir):
    response = agents["own"].upload(ct_file[: len(ct_file) - 1000])
    assert response.status_code == 400
    assert "truncated" in response.json()["error"]
    assert stored_files(storage_dir) == []
    assert Instance.objects.count() == 0


@pytest.mark.parametrize(
    "keyword", ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"]
)
def test_it_rejects_a_missing_required_attribute(agents, storage_dir, keyword):
    response = agents["own"].upload(dicom_bytes("CT", **{keyword: None}))
    assert response.status_code == 400
    assert keyword in response.json()["error"]
    assert stored_files(storage_dir) == []


def test_it_rejects_an_invalid_uid(agents, storage_dir):
    response = agents["own"].upload(dicom_bytes("CT", SeriesInstanceUID="1.2.3.abc"))
    assert response.status_code == 400
    assert "not a valid UID" in response.json()["error"]


def test_it_answers_415_to_another_content_type(agents, ct_file):
    response = agents["own"].upload(ct_file, content_type="application/octet-stream")
    assert response.status_code == 415


def test_it_answers_401_without_a_key(client, network, ct_file):
    response = client.post("/api/v1/instances", data=ct_file, content_type="application/dicom")
    assert response.status_code == 401
    assert response.json()["error"]


def test_it_answers_401_to_an_unknown_key(client, network, ct_file):
    response = client.post(
        "/api/v1/instances", data=ct_file, content_type="application/dicom", HTTP_AUTHORIZATION="Bearer dx_nonsense"
    )
    assert response.status_code == 401


def test_it_answers_401_to_a_revoked_key(agents, keys, ct_file):
    from centers.models import ApiKey
    from centers.services import apikey_revoke, key_digest

    apikey_revoke(api_key=ApiKey.objects.get(digest=key_digest(keys["own"])))
    assert agents["own"].upload(ct_file).status_code == 401


def test_it_answers_403_when_the_center_may_not_publish(agents, ct_file):
    response = agents["partner"].upload(ct_file)
    assert response.status_code == 403
    assert "not allowed to publish" in response.json()["error"]


def test_it_answers_413_over_the_size_limit(agents, settings, ct_file, storage_dir):
    settings.DICOM_MAX_UPLOAD_BYTES = len(ct_file) - 1
    response = agents["own"].upload(ct_file)
    assert response.status_code == 413
    assert stored_files(storage_dir) == []


def test_it_answers_413_when_a_deflated_file_inflates_past_the_limit(agents, settings, storage_dir):
    from tests.dicomfiles import sample_path

    data = sample_path("image_dfl.dcm").read_bytes()
    settings.DICOM_MAX_UPLOAD_BYTES = len(data) + 100
    response = agents["own"].upload(data)
    assert response.status_code == 413
    assert "inflates" in response.json()["error"]


def test_it_leaves_no_file_when_the_database_write_fails(agents, ct_file, storage_dir, monkeypatch):
    from routing import services

    def broken_index(**kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(services, "_index", broken_index)
    with pytest.raises(RuntimeError):
        agents["own"].upload(ct_file)
    assert stored_files(storage_dir) == []
    assert Instance.objects.count() == 0


def test_every_publish_is_audited(agents, ct_file, network):
    from centers.models import AuditEvent

    agents["own"].upload(ct_file)
    event = AuditEvent.objects.get(action="instance.publish")
    assert event.center == network["own"]
    assert event.api_key is not None
    assert event.address == "127.0.0.1"


def test_an_upload_into_a_known_series_is_indexed_and_audited_like_the_first(agents, network, storage_dir):
    from centers.models import AuditEvent

    same_series = {"study_uid": "1.2.3.4", "series_uid": "1.2.3.4.5"}
    first = agents["own"].upload(dicom_bytes("CT", instance_number=1, **same_series))
    second_file = dicom_bytes("CT", instance_number=2, **same_series)
    second = agents["own"].upload(second_file)
    assert (first.status_code, second.status_code) == (201, 201)
    assert second.json()["series_instance_uid"] == first.json()["series_instance_uid"]
    instance = Instance.objects.get(sop_instance_uid=second.json()["sop_instance_uid"])
    assert (instance.series, instance.source_center, instance.size) == (
        Series.objects.get(),
        network["own"],
        len(second_file),
    )
    assert instance.routed_at is not None and Delivery.objects.filter(instance=instance).count() == 1
    events = AuditEvent.objects.filter(action="instance.publish").order_by("pk")
    assert [e.object_id for e in events] == [
        str(Instance.objects.get(sop_instance_uid=r.json()["sop_instance_uid"]).pk) for r in (first, second)
    ]
    assert {(e.center, e.address, e.api_key_id is not None) for e in events} == {(network["own"], "127.0.0.1", True)}


def test_it_refuses_native_pixel_data_shorter_than_its_image_naming_both_sizes(agents, storage_dir):
    """pydicom's MR_truncated.dcm, saved again so its lengths agree, used to be stored and delivered."""
    import io

    import pydicom

    from tests.dicomfiles import sample_path

    dataset = pydicom.dcmread(sample_path("MR_truncated.dcm"))
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    response = agents["own"].upload(out.getvalue())
    assert response.status_code == 400
    assert "8130 bytes" in response.json()["error"] and "8192 bytes" in response.json()["error"]
    assert stored_files(storage_dir) == []


@pytest.mark.parametrize(
    "header",
    [b"\x7fELF\x02\x01\x01\x00", b"MZ\x90\x00\x03\x00\x00\x00\x04\x00", b"\xcf\xfa\xed\xfe", b"#!/bin/sh\n"],
    ids=["ELF", "PE", "Mach-O", "shebang"],
)
def test_an_executable_preamble_is_zeroed_in_the_answer_the_storage_and_the_delivery(
    agents, ct_file, storage_dir, header
):
    """CVE-2019-11687: the file stays a usable image and stops being a program."""
    from centers.models import AuditEvent

    polyglot = header + ct_file[len(header) :]
    neutral = bytes(128) + ct_file[128:]
    response = agents["own"].upload(polyglot)
    assert response.status_code == 201
    assert response.json()["sha256"] == hashlib.sha256(neutral).hexdigest()
    assert response.json()["size"] == len(neutral)
    [path] = stored_files(storage_dir)
    assert path.read_bytes() == neutral
    assert AuditEvent.objects.get(action="instance.publish").detail["preamble_zeroed"]
    [item] = agents["partner"].lease().json()
    assert item["sha256"] == hashlib.sha256(neutral).hexdigest()
    assert b"".join(agents["partner"].file(item["id"]).streaming_content) == neutral
    # The same original bytes again are the same instance, not a conflict; so is the neutral file.
    again = agents["own"].upload(polyglot)
    assert (again.status_code, again.json()) == (200, response.json())
    assert agents["own"].upload(neutral).status_code == 200
    assert len(stored_files(storage_dir)) == 1


def test_a_preamble_that_is_not_an_executable_is_stored_as_sent(agents, ct_file, storage_dir):
    """A TIFF header is what the preamble is for (dual-format files)."""
    tiff = b"II*\x00\x08\x00\x00\x00" + ct_file[8:]
    response = agents["own"].upload(tiff)
    assert response.status_code == 201
    assert response.json()["sha256"] == hashlib.sha256(tiff).hexdigest()
    [path] = stored_files(storage_dir)
    assert path.read_bytes() == tiff


def test_an_unexpected_failure_of_the_header_reader_answers_400_and_logs_no_value(agents, ct_file, monkeypatch, caplog):
    """The safety net: a reader bug on a client's bytes is still the client's file, never a 500."""
    from routing import services

    def broken(path, *, max_inflated):
        raise KeyError("^".join(["Doe", "Jane"]))  # built here, so the traceback's source line does not hold it

    monkeypatch.setattr(services, "read_header", broken)
    response = agents["own"].upload(ct_file)
    assert response.status_code == 400
    assert "cannot be read" in response.json()["error"]
    assert "header reader failed" in caplog.text and "KeyError" in caplog.text
    assert "Doe^Jane" not in caplog.text
