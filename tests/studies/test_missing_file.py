"""A stored file that storage has lost answers 410 with a sentence, never a 500."""

import pytest

from routing.models import Instance


@pytest.fixture
def lost(study, storage_dir):
    """One CT instance whose row is committed but whose file is gone from storage."""
    sop_uid = next(uid for uid, (modality, _, _) in study["files"].items() if modality == "CT")
    instance = Instance.objects.select_related("series__study").get(sop_instance_uid=sop_uid)
    (storage_dir / instance.file).unlink()
    return instance


@pytest.fixture
def partner_browser(clinicians):
    clinicians["partner"].raise_request_exception = False
    return clinicians["partner"]


def test_a_clinician_downloading_a_lost_file_gets_410_naming_the_instance(partner_browser, lost):
    response = partner_browser.get(f"/instances/{lost.sop_instance_uid}/download")

    assert response.status_code == 410
    assert lost.sop_instance_uid in response.content.decode()


def test_the_viewer_asking_for_a_frame_of_a_lost_file_gets_410(partner_browser, lost):
    response = partner_browser.get(f"/instances/{lost.sop_instance_uid}/frames/1")

    assert response.status_code == 410


def test_dicomweb_metadata_and_frames_of_a_lost_file_answer_410_in_json(client, keys, lost):
    client.raise_request_exception = False
    auth = {"HTTP_AUTHORIZATION": f"Bearer {keys['partner']}"}
    series = lost.series
    base = f"/dicomweb/studies/{series.study.study_instance_uid}/series/{series.series_instance_uid}"
    base += f"/instances/{lost.sop_instance_uid}"

    for path in (f"{base}/metadata", f"{base}/frames/1"):
        response = client.get(path, **auth)
        assert response.status_code == 410, (path, response.status_code)
        assert lost.sop_instance_uid in response.json()["error"]
