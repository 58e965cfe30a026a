"""dicomweb-client, a DICOMweb library no one here wrote, against the real running stack.

PostgreSQL, RabbitMQ, a Celery worker and uvicorn run as processes
(tests/integration/stack.py); the client talks HTTP to them like any hospital
tool, through both its Python API and its `dicomweb_client` command line.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom.uid import generate_uid

from tests.dicomfiles import dicom_bytes
from tests.integration.stack import wait_for

pytestmark = pytest.mark.integration
CLI = str(Path(sys.executable).parent / "dicomweb_client")


def client_for(stack, key: str) -> DICOMwebClient:
    return DICOMwebClient(url=f"{stack.url}/dicomweb", headers={"Authorization": f"Bearer {key}"})


def dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def encoded(ds: pydicom.Dataset) -> bytes:
    """The bytes dicomweb-client sends for a dataset."""
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds)
    return out.getvalue()


def uids(documents: list[dict], tag: str) -> list[str]:
    return sorted(d[tag]["Value"][0] for d in documents)


@pytest.fixture
def study(pg_network):
    """A CT+MR study of one patient, published by the network's imaging center through dicomweb-client."""
    s = pg_network.s
    study_uid, ct_series, mr_series = generate_uid(), generate_uid(), generate_uid()
    common = {
        "study_uid": study_uid,
        "patient_id": f"PID-{s}",
        "patient_name": f"Karimi^Sara{s}",
        "StudyDate": "20250611",
        "AccessionNumber": f"ACC-{s}",
    }
    datasets = [dataset(dicom_bytes("CT", series_uid=ct_series, instance_number=n, **common)) for n in (1, 2, 3)]
    datasets.append(dataset(dicom_bytes("MR", series_uid=mr_series, **common)))
    response = client_for(pg_network.stack, pg_network.keys["own"]).store_instances(datasets)
    assert len(response.ReferencedSOPSequence) == 4
    assert "FailedSOPSequence" not in response
    return {
        "uid": study_uid,
        "ct": ct_series,
        "mr": mr_series,
        "datasets": datasets,
        "patient_id": common["patient_id"],
        "s": s,
    }


def test_dicomweb_client_searches_a_stored_study_at_every_level(pg_network, study):
    client = client_for(pg_network.stack, pg_network.keys["own"])
    s = study["s"]
    for filters in (
        {"PatientID": study["patient_id"]},
        {"PatientName": f"karimi^sara{s}"},
        {"PatientName": f"KAR*{s}"},
        {"PatientName": f"Karimi^Sar?{s}"},
        {"StudyDate": "20250601-20250630", "PatientID": study["patient_id"]},
        {"StudyInstanceUID": study["uid"]},
        {"AccessionNumber": f"ACC-{s}"},
        {"ModalitiesInStudy": "MR", "PatientID": study["patient_id"]},
    ):
        found = client.search_for_studies(search_filters=filters)
        assert uids(found, "0020000D") == [study["uid"]], filters
    assert client.search_for_studies(search_filters={"StudyDate": "20250701-", "PatientID": study["patient_id"]}) == []
    # OHIF's way: tags for keys and for includefield.
    found = client.search_for_studies(search_filters={"00100020": study["patient_id"]}, fields=["00081030", "00080060"])
    assert found[0]["00201208"]["Value"] == [4]

    series = client.search_for_series(study["uid"])
    assert uids(series, "0020000E") == sorted([study["ct"], study["mr"]])
    assert uids(
        client.search_for_series(search_filters={"Modality": "MR", "PatientID": study["patient_id"]}), "0020000E"
    ) == [study["mr"]]
    instances = client.search_for_instances(study["uid"], study["ct"])
    assert [i["00200013"]["Value"] for i in instances] == [[1], [2], [3]]
    page = client.search_for_instances(study["uid"], study["ct"], limit=1, offset=2)
    assert [i["00200013"]["Value"] for i in page] == [[3]]
    sop = study["datasets"][0].SOPInstanceUID
    assert uids(client.search_for_instances(search_filters={"SOPInstanceUID": sop}), "00080018") == [sop]
    assert uids(
        client.search_for_instances(study["uid"], search_filters={"SeriesInstanceUID": study["mr"]}), "0020000E"
    ) == [study["mr"]]
    everything = client.search_for_studies(search_filters={"PatientID": study["patient_id"]}, get_remaining=True)
    assert len(everything) == 1


def test_dicomweb_client_retrieves_the_study_byte_identical(pg_network, study):
    client = client_for(pg_network.stack, pg_network.keys["own"])
    sent = {ds.SOPInstanceUID: encoded(ds) for ds in study["datasets"]}
    retrieved = client.retrieve_study(study["uid"])
    assert {ds.SOPInstanceUID: encoded(ds) for ds in retrieved} == sent
    first = study["datasets"][0]
    # The raw parts, undecoded: exactly the bytes that were stored.
    url = (
        f"{pg_network.stack.url}/dicomweb/studies/{study['uid']}/series/{study['ct']}/instances/{first.SOPInstanceUID}"
    )
    (raw,) = list(client._http_get_multipart(url))
    assert raw == sent[first.SOPInstanceUID]
    instance = client.retrieve_instance(study["uid"], study["ct"], first.SOPInstanceUID)
    assert encoded(instance) == sent[first.SOPInstanceUID]
    (frame,) = client.retrieve_instance_frames(study["uid"], study["ct"], first.SOPInstanceUID, frame_numbers=[1])
    assert frame == first.PixelData
    metadata = client.retrieve_series_metadata(study["uid"], study["ct"])
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sorted(
        ds.SOPInstanceUID for ds in study["datasets"][:3]
    )
    assert all("BulkDataURI" in m["7FE00010"] for m in metadata)


def test_dicomweb_client_command_line_stores_searches_and_retrieves(pg_network, tmp_path):
    stack, key = pg_network.stack, pg_network.keys["own"]
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for n in (1, 2):
        path = tmp_path / f"ct{n}.dcm"
        path.write_bytes(
            dicom_bytes(
                "CT", study_uid=study_uid, series_uid=series_uid, patient_id=f"CLI-{pg_network.s}", instance_number=n
            )
        )
        files.append(path)
    base = [CLI, "--url", f"{stack.url}/dicomweb", "--bearer-token", key]

    def run(*args):
        result = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    run("store", "instances", *map(str, files))
    found = json.loads(run("search", "studies", "--filter", f"PatientID=CLI-{pg_network.s}"))
    assert [d["0020000D"]["Value"][0] for d in found] == [study_uid]
    sop = dataset(files[1].read_bytes()).SOPInstanceUID
    out = tmp_path / "out"
    out.mkdir()
    run(
        "retrieve", "instances", "--study", study_uid, "--series", series_uid, "--instance", sop,
        "full", "--save", "--output-dir", str(out),
    )  # fmt: skip
    (saved,) = out.iterdir()
    assert encoded(dataset(saved.read_bytes())) == encoded(dataset(files[1].read_bytes()))


def large_ct_series(study_uid: str, count: int, patient_id: str) -> list[pydicom.Dataset]:
    series_uid = generate_uid()
    rng = np.random.default_rng(5)
    out = []
    for n in range(1, count + 1):
        ds = dataset(
            dicom_bytes("CT", study_uid=study_uid, series_uid=series_uid, instance_number=n, patient_id=patient_id)
        )
        ds.Rows = ds.Columns = 512
        ds.PixelData = rng.integers(-1000, 2000, size=(512, 512), dtype=np.int16).tobytes()
        out.append(ds)
    return out


def test_a_50_mb_chunked_stow_reaches_the_subscribing_centers_agents(pg_network, tmp_path):
    stack = pg_network.stack
    study_uid = generate_uid()
    datasets = large_ct_series(study_uid, 100, patient_id=f"BIG-{pg_network.s}")
    sent = {ds.SOPInstanceUID: encoded(ds) for ds in datasets}
    assert sum(map(len, sent.values())) > 50 * 1024 * 1024

    # dicomweb-client sends any body over its 1 MB chunk size with Transfer-Encoding: chunked.
    seen = []
    client = client_for(stack, pg_network.keys["own"])
    client._session.hooks["response"].append(lambda r, *a, **k: seen.append(r.request.headers))
    response = client.store_instances(datasets)
    assert seen[-1].get("Transfer-Encoding") == "chunked" and "Content-Length" not in seen[-1]
    assert len(response.ReferencedSOPSequence) == 100

    # The fan-out ran on the worker: the partner (fars.#) gets them, the MR-only center does not.
    partner = pg_network.keys["partner"]
    wait_for(
        lambda: (
            stack.sql(
                "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id"
                " JOIN routing_instance i ON i.id = d.instance_id WHERE c.slug = %s AND i.sop_instance_uid = ANY(%s)",
                f"partner-{pg_network.s}",
                list(sent),
            )[0][0]
            == 100
        ),
        timeout=60,
        what="100 deliveries to the partner",
    )
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    result = stack.agent(partner, "receive", "--inbox", str(inbox), "--once")
    assert result.returncode == 0, result.stderr
    received = {p.stem: p.read_bytes() for p in inbox.rglob("*.dcm")}
    assert received == sent
    mr_inbox = tmp_path / "mr"
    mr_inbox.mkdir()
    assert stack.agent(pg_network.keys["mr"], "receive", "--inbox", str(mr_inbox), "--once").returncode == 0
    assert not list(mr_inbox.rglob("*.dcm"))

    # And the partner finds the study over DICOMweb now that it received it.
    partner_client = client_for(stack, partner)
    assert uids(partner_client.search_for_studies(search_filters={"StudyInstanceUID": study_uid}), "0020000D") == [
        study_uid
    ]


def test_a_center_never_sees_another_centers_studies(pg_network, study):
    outsider = client_for(pg_network.stack, pg_network.keys["outsider"])
    assert outsider.search_for_studies(search_filters={"StudyInstanceUID": study["uid"]}) == []
    assert outsider.search_for_studies(search_filters={"PatientID": study["patient_id"]}) == []
    assert outsider.search_for_series(search_filters={"StudyInstanceUID": study["uid"]}) == []
    assert outsider.search_for_instances(study["uid"]) == []
    with pytest.raises(requests.HTTPError) as refused:
        outsider.retrieve_study(study["uid"])
    assert refused.value.response.status_code == 404
    with pytest.raises(requests.HTTPError) as refused:
        outsider.retrieve_series_metadata(study["uid"], study["ct"])
    assert refused.value.response.status_code == 404
    # The MR-only center received the MR series and sees that series only.
    mr = client_for(pg_network.stack, pg_network.keys["mr"])
    wait_for(lambda: mr.search_for_studies(search_filters={"StudyInstanceUID": study["uid"]}), what="the MR delivery")
    assert uids(mr.search_for_series(study["uid"]), "0020000E") == [study["mr"]]
    with pytest.raises(requests.HTTPError):
        mr.retrieve_series(study["uid"], study["ct"])
    unauthenticated = DICOMwebClient(url=f"{pg_network.stack.url}/dicomweb")
    with pytest.raises(requests.HTTPError) as refused:
        unauthenticated.search_for_studies()
    assert refused.value.response.status_code == 401
