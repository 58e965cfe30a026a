import io
import re
from io import StringIO

import numpy as np
import pydicom
import pytest
from django.core.management import call_command
from django.test import Client
from PIL import Image

from centers.models import ApiKey, AuditEvent
from demo.studies import CT_SLICES, MR_SLICES, PATIENT_NAME, STUDY_UID, demo_files, uid
from routing.models import Delivery, Instance

pytestmark = pytest.mark.django_db
DEMO_INSTANCES = CT_SLICES + MR_SLICES


@pytest.fixture
def demo_setup(storage_dir, django_capture_on_commit_callbacks):
    def run() -> str:
        out = StringIO()
        # The test's transaction never commits: run the fan-out each ingest queues on commit.
        with django_capture_on_commit_callbacks(execute=True):
            call_command("demo_setup", stdout=out)
        return out.getvalue()

    return run


def clinician_login(output: str, center: str) -> tuple[str, str]:
    match = re.search(rf"^  {center}\s+(\S+) / (\S+)", output, re.MULTILINE)
    assert match, output
    return match.group(1), match.group(2)


def logged_in(username: str, password: str) -> Client:
    browser = Client()
    response = browser.post("/login/", {"username": username, "password": password})
    assert response.status_code == 302, response.content
    return browser


def test_the_demo_files_are_a_ct_and_an_mr_series_of_real_images():
    files = list(demo_files())
    assert len(files) == DEMO_INSTANCES == len({uid for uid, _ in files})
    assert files == list(demo_files())  # the same bytes every run, so a rerun finds them stored
    datasets = [pydicom.dcmread(io.BytesIO(data)) for _, data in files]
    assert {(ds.Modality, ds.SeriesInstanceUID) for ds in datasets} == {
        ("CT", datasets[0].SeriesInstanceUID),
        ("MR", datasets[-1].SeriesInstanceUID),
    }
    assert {ds.StudyInstanceUID for ds in datasets} == {STUDY_UID}
    ct = datasets[CT_SLICES // 2]
    assert ct.PatientName == PATIENT_NAME and ct.file_meta.MediaStorageSOPInstanceUID == ct.SOPInstanceUID
    assert (ct.Rows, ct.Columns, ct.WindowCenter, ct.WindowWidth) == (128, 128, 40, 80)
    hu = ct.pixel_array * ct.RescaleSlope + ct.RescaleIntercept
    assert hu.min() == -1000 and hu.max() == 1000  # air around the head, and its skull
    assert 35 in hu  # brain
    assert not np.array_equal(datasets[0].pixel_array, ct.pixel_array)  # the head narrows towards its top


def test_it_publishes_the_demo_study_through_the_exchange_to_the_subscribed_centers(demo_setup):
    output = demo_setup()
    shiraz_key = ApiKey.objects.get(center__slug="shiraz-imaging", revoked_at__isnull=True)
    instances = Instance.objects.filter(series__study__study_instance_uid=STUDY_UID)
    assert instances.count() == DEMO_INSTANCES
    assert set(instances.values_list("source_center__slug", "uploaded_with")) == {("shiraz-imaging", shiraz_key.pk)}
    assert AuditEvent.objects.filter(action="instance.publish", api_key=shiraz_key).count() == DEMO_INSTANCES
    routed = {
        center: Delivery.objects.filter(center__slug=center, instance__in=instances).count()
        for center in ("tehran-hospital", "marvdasht-clinic", "isfahan-nuclear", "shiraz-imaging")
    }
    # Tehran subscribes to fars.#, Marvdasht to fars.shiraz.mr, Isfahan to NM and PET only.
    assert routed == {"tehran-hospital": DEMO_INSTANCES, "marvdasht-clinic": MR_SLICES, "isfahan-nuclear": 0,
                      "shiraz-imaging": 0}  # fmt: skip
    assert f"{DEMO_INSTANCES} new instance(s), 0 already stored" in output


def test_the_printed_clinicians_see_the_study_received_and_sent(demo_setup):
    output = demo_setup()
    tehran = logged_in(*clinician_login(output, "tehran-hospital"))
    page = tehran.get("/received/").content.decode()
    assert f'data-study-uid="{STUDY_UID}"' in page and "Tehran Hospital" in page
    assert "DEMO, PATIENT" in page  # DEMO^PATIENT as people write it
    sop_uid = next(demo_files())[0]
    frame = tehran.get(f"/instances/{sop_uid}/frames/0")
    assert frame.status_code == 200
    assert Image.open(io.BytesIO(frame.content)).size == (128, 128)
    for modality in ("CT", "MR"):
        thumbnail = tehran.get(f"/series/{uid(modality, 'series')}/thumbnail.jpg")
        assert thumbnail.status_code == 200 and Image.open(io.BytesIO(thumbnail.content)).format == "JPEG"

    shiraz = logged_in(*clinician_login(output, "shiraz-imaging"))
    assert f'data-study-uid="{STUDY_UID}"' in shiraz.get("/sent/").content.decode()
    assert f'data-study-uid="{STUDY_UID}"' not in shiraz.get("/received/").content.decode()


def test_a_second_run_publishes_nothing_new_and_rotates_every_secret(demo_setup):
    first = demo_setup()
    deliveries = Delivery.objects.count()
    second = demo_setup()
    assert Instance.objects.count() == DEMO_INSTANCES and Delivery.objects.count() == deliveries
    assert f"0 new instance(s), {DEMO_INSTANCES} already stored" in second
    assert AuditEvent.objects.filter(action="instance.republish").count() == DEMO_INSTANCES

    old, new = clinician_login(first, "tehran-hospital"), clinician_login(second, "tehran-hospital")
    assert old[0] == new[0] and old[1] != new[1]
    assert Client().post("/login/", {"username": old[0], "password": old[1]}).status_code == 200  # refused
    logged_in(*new)
    first_keys = set(re.findall(r"dx_\S+", first))
    assert len(first_keys) == 4 and not first_keys & set(re.findall(r"dx_\S+", second))
    assert ApiKey.objects.filter(revoked_at__isnull=True).count() == 4


def test_the_administrator_is_shown_where_to_go_instead_of_a_dead_end(demo_setup):
    output = demo_setup()
    username, password = re.search(r"^Administrator: (\S+) / (\S+)", output, re.MULTILINE).groups()
    page = logged_in(username, password).get("/", follow=True).content.decode()
    assert "network administrator" in page and "not linked to a center" not in page
    assert 'href="/admin/"' in page and "dr-tehran" in page
