import io
import json

import pydicom

from tests.dicomfiles import dicom_bytes
from tests.dicomweb.conftest import parts_of, values

STUDY = "1.2.826.0.1.3680043.8.498.5001"


def test_a_center_sees_what_it_published_or_received_and_nothing_else(web):
    ct = dicom_bytes("CT", study_uid=STUDY)
    assert web["own"].stow(ct).status_code == 200
    sop = pydicom.dcmread(io.BytesIO(ct))
    series_path = f"/dicomweb/studies/{STUDY}/series/{sop.SeriesInstanceUID}"

    # The partner subscribed to fars.# received it; the outsider (#.nm) did not.
    assert [values(d, "0020000D") for d in web["partner"].search("/dicomweb/studies")] == [[STUDY]]
    assert [content for _, content in parts_of(web["partner"].get(series_path))] == [ct]

    outsider = web["outsider"]
    assert outsider.search("/dicomweb/studies") == []
    assert outsider.search("/dicomweb/studies", StudyInstanceUID=STUDY) == []
    assert outsider.search("/dicomweb/series") == []
    assert outsider.search("/dicomweb/instances", SOPInstanceUID=sop.SOPInstanceUID) == []
    for path in (
        f"/dicomweb/studies/{STUDY}",
        f"/dicomweb/studies/{STUDY}/metadata",
        series_path,
        f"{series_path}/instances/{sop.SOPInstanceUID}",
        f"{series_path}/instances/{sop.SOPInstanceUID}/frames/1",
        f"{series_path}/instances/{sop.SOPInstanceUID}/rendered",
    ):
        response = outsider.get(path)
        assert response.status_code == 404, path
        # Exactly what an unknown UID answers: nothing tells the study exists.
        assert json.loads(response.content) == {
            "error": json.loads(outsider.get(path.replace(STUDY, "1.2.3")).content)["error"]
        }


def test_a_clinician_session_sees_its_centers_studies(web, client, network, django_user_model):
    from centers.models import Membership

    assert web["own"].stow(dicom_bytes("CT", study_uid=STUDY)).status_code == 200
    user = django_user_model.objects.create_user("reza", password="s3cret-pass")
    Membership.objects.create(user=user, center=network["partner"])
    client.force_login(user)
    response = client.get("/dicomweb/studies")
    assert response.status_code == 200
    assert [values(d, "0020000D") for d in json.loads(response.content)] == [[STUDY]]
    other = django_user_model.objects.create_user("sara", password="s3cret-pass")
    Membership.objects.create(user=other, center=network["outsider"])
    client.force_login(other)
    assert json.loads(client.get("/dicomweb/studies").content) == []


def test_every_dicomweb_access_is_audited(web):
    from centers.models import AuditEvent

    web["own"].stow(dicom_bytes("CT", study_uid=STUDY))
    web["partner"].search("/dicomweb/studies")
    web["partner"].get(f"/dicomweb/studies/{STUDY}")
    actions = list(
        AuditEvent.objects.filter(action__startswith="dicomweb.").order_by("pk").values_list("action", flat=True)
    )
    assert actions == ["dicomweb.search", "dicomweb.retrieve"]
    assert AuditEvent.objects.filter(action="instance.publish").count() == 1
