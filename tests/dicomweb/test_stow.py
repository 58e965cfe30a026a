import json

from routing.models import Delivery, Instance, Priority
from tests.dicomfiles import dicom_bytes
from tests.dicomweb.conftest import BOUNDARY, stow_body, stow_type, values


def test_it_stores_many_instances_in_one_request_and_fans_them_out(web, network):
    study = "1.2.826.0.1.3680043.8.498.1001"
    files = [dicom_bytes("CT", study_uid=study, instance_number=n) for n in range(1, 4)]
    response = web["own"].stow(*files)
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/dicom+json"
    body = json.loads(response.content)
    referenced = values(body, "00081199")
    assert len(referenced) == 3
    assert values(body, "00081190") == [f"http://testserver/dicomweb/studies/{study}"]
    stored = Instance.objects.filter(series__study__study_instance_uid=study)
    uids = set(stored.values_list("sop_instance_uid", flat=True))
    assert {values(item, "00081155")[0] for item in referenced} == uids
    assert all(values(item, "00081190")[0].endswith(values(item, "00081155")[0]) for item in referenced)
    # Same fan-out as an agent's upload: the partner subscribed to fars.# has one delivery per instance.
    assert Delivery.objects.filter(center=network["partner"], instance__in=stored).count() == 3
    assert not Delivery.objects.filter(center=network["outsider"]).exists()


def test_it_answers_202_with_the_failure_reason_when_some_parts_fail(web):
    good = dicom_bytes("CT")
    response = web["own"].stow(good, b"this is not DICOM at all")
    assert response.status_code == 202
    body = json.loads(response.content)
    assert len(values(body, "00081199")) == 1
    failed = values(body, "00081198")
    assert [values(item, "00081197") for item in failed] == [[0xC000]]
    assert values(body, "00081196") == [0xB000]
    assert "DICM" in response["Warning"]


def test_it_answers_409_when_every_part_fails(web):
    response = web["own"].stow(b"junk", b"more junk")
    assert response.status_code == 409
    assert len(values(json.loads(response.content), "00081198")) == 2


def test_it_reports_a_conflicting_sop_instance_as_a_duplicate(web):
    sop = "1.2.826.0.1.3680043.8.498.2002"
    assert web["own"].stow(dicom_bytes("CT", sop_uid=sop)).status_code == 200
    response = web["own"].stow(dicom_bytes("CT", sop_uid=sop, patient_id="OTHER"))
    assert response.status_code == 409
    failed = values(json.loads(response.content), "00081198")[0]
    assert values(failed, "00081155") == [sop]
    assert values(failed, "00081197") == [0x0111]


def test_it_refuses_an_instance_of_another_study_than_the_url_names(web):
    response = web["own"].stow(dicom_bytes("CT"), study="1.2.3.4.5")
    assert response.status_code == 409
    assert values(values(json.loads(response.content), "00081198")[0], "00081197") == [0xA900]
    assert not Instance.objects.exists()


def test_it_refuses_a_wrong_content_type_with_415(web):
    response = web["own"].stow(body=dicom_bytes("CT"), content_type="application/dicom")
    assert response.status_code == 415
    response = web["own"].stow(
        dicom_bytes("CT"), content_type=f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'
    )
    assert response.status_code == 415


def test_it_answers_400_for_a_boundary_that_never_closes(web):
    body = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + dicom_bytes("CT")
    response = web["own"].stow(body=body)
    assert response.status_code == 400
    assert "closing boundary" in json.loads(response.content)["error"]
    assert not Instance.objects.exists()


def test_it_keeps_the_complete_parts_before_a_truncated_one(web):
    first = dicom_bytes("CT")
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + first
        + f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + dicom_bytes("CT")[:500]
    )
    response = web["own"].stow(body=body)
    assert response.status_code == 202
    assert Instance.objects.count() == 1


def test_it_refuses_a_part_that_is_not_application_dicom(web):
    response = web["own"].stow(
        body=f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nhello\r\n--{BOUNDARY}--\r\n".encode()
    )
    assert response.status_code == 409


def test_it_needs_a_key_and_a_center_that_may_publish(web, client):
    response = client.post("/dicomweb/studies", data=b"", content_type=stow_type())
    assert response.status_code == 401
    assert web["partner"].stow(dicom_bytes("CT")).status_code == 403
    response = client.post(
        "/dicomweb/studies", data=b"", content_type=stow_type(), HTTP_AUTHORIZATION="Bearer dx_not_a_key"
    )
    assert response.status_code == 401


def test_stow_takes_the_uploads_priority_as_the_api_does(web, network):
    stat = dicom_bytes("CT", instance_number=1)
    with web["own"].on_commit(execute=True):
        response = web["own"].client.post(
            "/dicomweb/studies?priority=stat",
            data=stow_body(stat),
            content_type=stow_type(),
            CONTENT_TYPE=stow_type(),
            **web["own"].auth,
        )
    assert response.status_code == 200, response.content
    assert Delivery.objects.get(center=network["partner"]).priority == Priority.STAT


def test_stow_refuses_an_unknown_priority(web):
    response = web["own"].client.post(
        "/dicomweb/studies?priority=urgent",
        data=stow_body(dicom_bytes("CT")),
        content_type=stow_type(),
        CONTENT_TYPE=stow_type(),
        **web["own"].auth,
    )
    assert response.status_code == 400
    assert json.loads(response.content) == {"error": "'priority' must be one of routine, stat, not 'urgent'."}
    assert not Instance.objects.exists()
