import pytest
from django.test import Client
from pydicom.uid import generate_uid

from tests.dicomfiles import dicom_bytes

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def render_cache(settings, tmp_path):
    settings.CACHES = {
        **settings.CACHES,
        "renders": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(tmp_path / "rc")},
    }


@pytest.fixture
def clinicians(network):
    """A logged-in browser per center, plus one for a user who belongs to no center."""
    from django.contrib.auth.models import User

    from centers.models import Membership

    browsers = {}
    for name, center in [*network.items(), ("nobody", None)]:
        user = User.objects.create_user(f"dr-{name}", password=PASSWORD)
        if center is not None:
            Membership.objects.create(user=user, center=center)
        browser = Client()
        browser.force_login(user)
        browsers[name] = browser
    return browsers


@pytest.fixture
def study(agents):
    """A CT series of three slices and an MR series of two, published by our center in Shiraz."""
    study_uid, files = generate_uid(), {}
    for modality, count in (("CT", 3), ("MR", 2)):
        series_uid = generate_uid()
        for number in range(1, count + 1):
            data = dicom_bytes(
                modality,
                study_uid=study_uid,
                series_uid=series_uid,
                patient_id="PAT-777",
                patient_name="Rostami^Sara",
                instance_number=number,
                StudyDescription="Head trauma",
                StudyDate="20260301",
                SeriesNumber=1 if modality == "CT" else 2,
            )
            response = agents["own"].upload(data)
            assert response.status_code == 201, response.content
            files[response.json()["sop_instance_uid"]] = (modality, series_uid, data)
    return {"uid": study_uid, "files": files}
