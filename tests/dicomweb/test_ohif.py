"""OHIF Viewer, the prebuilt @ohif/app from the npm registry, on the portal's DICOMweb in headless Chromium."""

import io

import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from PIL import Image, ImageStat
from pydicom.uid import generate_uid

from tests.chromium import CHROMIUM
from tests.chromium import FLAGS as CHROMIUM_FLAGS
from tests.dicomfiles import dicom_bytes
from tests.dicomweb.ohif import OhifServer, ohif_dist
from tests.integration.stack import free_port, wait_for

pytestmark = pytest.mark.integration


def ct_series(study_uid: str, patient_id: str, patient_name: str, count: int = 5) -> list[pydicom.Dataset]:
    series_uid = generate_uid()
    out = []
    for n in range(1, count + 1):
        ds = pydicom.dcmread(
            io.BytesIO(
                dicom_bytes(
                    "CT",
                    study_uid=study_uid,
                    series_uid=series_uid,
                    instance_number=n,
                    patient_id=patient_id,
                    patient_name=patient_name,
                    StudyDescription="OHIF chest",
                    SeriesDescription="Axial CT",
                )
            )
        )
        ds.ImagePositionPatient = [-158.0, -180.0, -10.0 * n]
        ds.SliceLocation = -10.0 * n
        out.append(ds)
    return out


def drawn(canvas) -> Image.Image | None:
    """The canvas as a grey image once a CT slice is on it: a real image has many grey levels and contrast."""
    shot = Image.open(io.BytesIO(canvas.screenshot())).convert("L")
    if len(shot.getcolors(maxcolors=256) or []) > 50 and ImageStat.Stat(shot).stddev[0] > 10:
        return shot
    return None


@pytest.fixture
def viewer(pg_network):
    """The portal answering the viewer's origin (CORS), and OHIF served beside it."""
    stack = pg_network.stack
    dist = ohif_dist()
    port = free_port()
    portal_url = f"http://127.0.0.1:{port}"
    with OhifServer(dist, portal_url) as ohif:
        server = stack.start_server(
            port=port, env={**stack.env, "DICOMWEB_CORS_ORIGINS": ohif.url}, name="server-for-ohif"
        )
        try:
            yield {"ohif": ohif, "portal": portal_url}
        finally:
            server.stop()


def test_ohif_lists_a_centers_studies_and_opens_a_ct_series(pg_network, viewer):
    from playwright.sync_api import sync_playwright

    s = pg_network.s
    study_uid = generate_uid()
    key = pg_network.keys["own"]
    client = DICOMwebClient(url=f"{viewer['portal']}/dicomweb", headers={"Authorization": f"Bearer {key}"})
    client.store_instances(ct_series(study_uid, f"OHIF-{s}", f"Viewer^Olga{s}"))
    # Another center's study, which the viewer must not list.
    hidden_uid = generate_uid()
    other = DICOMwebClient(
        url=f"{viewer['portal']}/dicomweb", headers={"Authorization": f"Bearer {pg_network.keys['outsider']}"}
    )
    other.store_instances(ct_series(hidden_uid, f"HIDE-{s}", f"Hidden^Hans{s}", count=1))

    frames, failures = [], []

    def watch(response) -> None:
        if "/dicomweb/" not in response.url:
            return
        if response.status >= 400:
            failures.append(f"{response.status} {response.url}")
        elif "/frames/" in response.url:
            frames.append(response.url)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("response", watch)
            # The viewer route takes the center's key (?token=) and sends it as a Bearer header, cross-origin.
            with page.expect_response(lambda r: "/frames/" in r.url and r.status == 200, timeout=120_000):
                page.goto(f"{viewer['ohif'].url}/viewer?StudyInstanceUIDs={study_uid}&token={key}")
            page.get_by_text("Axial CT").first.wait_for(timeout=90_000)
            canvas = page.locator("canvas").first
            canvas.wait_for(timeout=90_000)
            # The slice is decoded and drawn a while after its frame arrives: wait for the drawing itself.
            wait_for(lambda: drawn(canvas), interval=0.5, what="the CT slice drawn on the viewer's canvas")
            page.screenshot(path=str(pg_network.stack.tmp / f"ohif-viewer-{s}.png"))

            # Back to the study list inside the app (the key stays with it): the center's studies only.
            page.evaluate("() => { history.pushState({}, '', '/'); dispatchEvent(new PopStateEvent('popstate')); }")
            # OHIF shows Viewer^Olga as "Viewer, Olga".
            page.get_by_text(f"Viewer, Olga{s}").first.wait_for(timeout=90_000)
            page.get_by_text("OHIF chest").first.wait_for(timeout=90_000)
            listed = page.content()
            page.screenshot(path=str(pg_network.stack.tmp / f"ohif-list-{s}.png"))
        finally:
            browser.close()
    assert frames, "the viewer fetched no frame"
    assert not failures, failures
    assert f"Hidden, Hans{s}" not in listed
    assert "OHIF chest" in listed
