import io
import json

import pydicom
import pytest
from pydicom.encaps import generate_frames

from tests.dicomfiles import dicom_bytes
from tests.dicomweb.conftest import parts_of, values

STUDY = "1.2.826.0.1.3680043.8.498.4001"
SERIES = "1.2.826.0.1.3680043.8.498.4001.1"
J2K_SERIES = "1.2.826.0.1.3680043.8.498.4001.2"


@pytest.fixture
def stored(web):
    ct = [dicom_bytes("CT", study_uid=STUDY, series_uid=SERIES, instance_number=n) for n in (1, 2)]
    j2k = dicom_bytes("US", study_uid=STUDY, series_uid=J2K_SERIES, sample="JPEG2000.dcm")
    assert web["own"].stow(*ct, j2k).status_code == 200
    return {"web": web["own"], "ct": ct, "j2k": j2k}


def uid(data: bytes) -> str:
    return pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID


def test_it_retrieves_a_study_series_and_instance_byte_identical(stored):
    web = stored["web"]
    response = web.get(f"/dicomweb/studies/{STUDY}", accept='multipart/related; type="application/dicom"')
    assert response.status_code == 200
    assert response["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert sorted(content for _, content in parts_of(response)) == sorted([*stored["ct"], stored["j2k"]])
    response = web.get(f"/dicomweb/studies/{STUDY}/series/{SERIES}")
    assert [content for _, content in parts_of(response)] == stored["ct"]
    first = stored["ct"][0]
    response = web.get(f"/dicomweb/studies/{STUDY}/series/{SERIES}/instances/{uid(first)}")
    ((headers, content),) = parts_of(response)
    assert content == first
    assert headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"


def test_it_answers_metadata_as_dicom_json_with_bulk_data_uris(stored, settings):
    settings.PORTAL_PUBLIC_URL = "https://exchange.example.org"
    response = stored["web"].get(f"/dicomweb/studies/{STUDY}/series/{J2K_SERIES}/metadata")
    assert response["Content-Type"] == "application/dicom+json"
    (document,) = json.loads(response.content)
    sop = uid(stored["j2k"])
    assert values(document, "00080018") == [sop]
    assert document["7FE00010"] == {
        "vr": "OB",
        "BulkDataURI": f"https://exchange.example.org/dicomweb/studies/{STUDY}/series/{J2K_SERIES}/instances/{sop}"
        "/bulk/7FE00010",
    }
    assert len(json.loads(stored["web"].get(f"/dicomweb/studies/{STUDY}/metadata").content)) == 3


def test_it_sends_native_frames_as_raw_bytes(stored):
    data = stored["ct"][1]
    dataset = pydicom.dcmread(io.BytesIO(data))
    response = stored["web"].get(
        f"/dicomweb/studies/{STUDY}/series/{SERIES}/instances/{dataset.SOPInstanceUID}/frames/1",
        accept='multipart/related; type="application/octet-stream"; transfer-syntax=*',
    )
    assert response.status_code == 200
    ((headers, content),) = parts_of(response)
    assert content == dataset.PixelData
    assert headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"


def test_it_sends_compressed_frames_as_stored_with_their_transfer_syntax(stored):
    dataset = pydicom.dcmread(io.BytesIO(stored["j2k"]))
    path = f"/dicomweb/studies/{STUDY}/series/{J2K_SERIES}/instances/{dataset.SOPInstanceUID}/frames/1"
    response = stored["web"].get(path, accept="multipart/related; type=application/octet-stream; transfer-syntax=*")
    ((headers, content),) = parts_of(response)
    assert content == next(generate_frames(dataset.PixelData, number_of_frames=1))
    assert headers["content-type"] == f"application/octet-stream; transfer-syntax={dataset.file_meta.TransferSyntaxUID}"
    # The portal does not transcode: asking for uncompressed frames of a JPEG 2000 image is 406.
    explicit = 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1'
    assert stored["web"].get(path, accept=explicit).status_code == 406
    assert stored["web"].get(path.replace("/frames/1", "/frames/2")).status_code == 404


def test_it_serves_wado_uri_for_older_viewers(stored):
    data = stored["ct"][0]
    params = {"requestType": "WADO", "studyUID": STUDY, "seriesUID": SERIES, "objectUID": uid(data)}
    response = stored["web"].get("/dicomweb/wado", contentType="application/dicom", **params)
    assert response["Content-Type"] == "application/dicom"
    assert b"".join(response.streaming_content) == data
    response = stored["web"].get("/dicomweb/wado", **params)
    assert response["Content-Type"] == "image/jpeg"
    assert response.content[:3] == b"\xff\xd8\xff"


def test_it_renders_instances_and_thumbnails(stored):
    sop = uid(stored["ct"][0])
    base = f"/dicomweb/studies/{STUDY}/series/{SERIES}"
    png = stored["web"].get(f"{base}/instances/{sop}/rendered", accept="image/png")
    assert png["Content-Type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    thumbnail = stored["web"].get(f"{base}/thumbnail", accept="image/jpeg")
    assert thumbnail["Content-Type"] == "image/jpeg"
    from PIL import Image

    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 128
    assert stored["web"].get(f"{base}/instances/{sop}/rendered", accept="application/pdf").status_code == 406


@pytest.mark.parametrize(
    "path",
    [
        "/dicomweb/studies/1.2.3",
        "/dicomweb/studies/1.2.3/metadata",
        f"/dicomweb/studies/{STUDY}/series/1.2.3",
        f"/dicomweb/studies/{STUDY}/series/{SERIES}/instances/1.2.3",
        f"/dicomweb/studies/{STUDY}/series/{SERIES}/instances/1.2.3/frames/1",
    ],
)
def test_an_unknown_uid_is_404(stored, path):
    assert stored["web"].get(path).status_code == 404


def test_an_unsupported_accept_type_is_406(stored):
    response = stored["web"].get(f"/dicomweb/studies/{STUDY}", accept="application/zip")
    assert response.status_code == 406
    response = stored["web"].get(f"/dicomweb/studies/{STUDY}/metadata", accept="application/dicom+xml")
    assert response.status_code == 406


def test_rendering_a_frame_that_does_not_exist_is_404(stored):
    sop = uid(stored["ct"][0])
    path = f"/dicomweb/studies/{STUDY}/series/{SERIES}/instances/{sop}/frames/2/rendered"
    assert stored["web"].get(path, accept="image/png").status_code == 404
    assert stored["web"].get(path.replace("/frames/2/", "/frames/1/"), accept="image/png").status_code == 200
