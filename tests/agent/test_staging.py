"""A whole study's files wait in the hidden staging folder until all of the lease's files of it are in."""

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import httpx

from agent.forward import ForwardError
from agent.receive import STAGING, Result, Target, handle_batch, prepare_inbox
from tests.dicomfiles import dicom_bytes


class Portal:
    """The portal's two answers a lease needs: the files, and the acknowledgements."""

    def __init__(self, files: dict[str, bytes], refused: set[str] = frozenset()) -> None:
        self.files = files
        self.refused = refused
        self.acked: list[int] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/file/"):
            name = request.url.path.removeprefix("/file/")
            if name in self.refused:
                return httpx.Response(404, json={"error": "no such delivery"})
            return httpx.Response(200, content=self.files[name])
        acks = json.loads(request.content)["acks"]
        self.acked += [a["id"] for a in acks]
        return httpx.Response(200, json={"results": [{"id": a["id"], "status": "delivered"} for a in acks]})


def lease_item(pk: int, data: bytes, *, study: str, deliver: str = "study") -> dict:
    return {
        "id": pk,
        "sop_instance_uid": f"1.2.3.{pk}",
        "study_instance_uid": study,
        "series_instance_uid": f"{study}.1",
        "patient_id": "PAT-1",
        "sha256": hashlib.sha256(data).hexdigest(),
        "download_url": f"http://portal.test/file/{pk}",
        "deliver": deliver,
    }


def run(portal: Portal, inbox, batch: list[dict]) -> list[Result]:
    client = httpx.Client(base_url="http://portal.test", transport=httpx.MockTransport(portal.handler))
    with ThreadPoolExecutor(max_workers=4) as pool:
        return handle_batch(client, Target(inbox), pool, batch)


def dcm_files(folder) -> set[str]:
    return {p.name for p in folder.rglob("*.dcm")} if folder.exists() else set()


def test_a_study_with_a_failed_file_is_not_placed_and_not_acknowledged(tmp_path):
    data = {str(pk): dicom_bytes("CT", instance_number=pk) for pk in range(1, 6)}
    portal = Portal(data, refused={"2"})
    batch = [lease_item(pk, data[str(pk)], study="1.9.1") for pk in (1, 2, 3)]
    batch += [lease_item(pk, data[str(pk)], study="1.9.2") for pk in (4, 5)]

    results = run(portal, tmp_path, batch)

    assert results == [Result.FAILED] * 3 + [Result.RECEIVED] * 2
    assert portal.acked == [4, 5]
    assert dcm_files(tmp_path / "PAT-1" / "1.9.1") == set()
    assert dcm_files(tmp_path / "PAT-1" / "1.9.2") == {"1.2.3.4.dcm", "1.2.3.5.dcm"}
    assert dcm_files(tmp_path / STAGING) == set()


def test_a_later_file_joins_the_study_already_in_the_inbox(tmp_path):
    data = {str(pk): dicom_bytes("CT", instance_number=pk) for pk in range(1, 4)}
    portal = Portal(data)
    run(portal, tmp_path, [lease_item(pk, data[str(pk)], study="1.9.1") for pk in (1, 2)])

    results = run(portal, tmp_path, [lease_item(3, data["3"], study="1.9.1")])

    assert results == [Result.RECEIVED]
    assert dcm_files(tmp_path / "PAT-1" / "1.9.1") == {"1.2.3.1.dcm", "1.2.3.2.dcm", "1.2.3.3.dcm"}


def test_instance_deliveries_go_straight_to_the_inbox_beside_a_failing_study(tmp_path):
    data = {str(pk): dicom_bytes("CT", instance_number=pk) for pk in range(1, 3)}
    portal = Portal(data, refused={"2"})
    batch = [lease_item(1, data["1"], study="1.9.1", deliver="instance"), lease_item(2, data["2"], study="1.9.2")]

    assert run(portal, tmp_path, batch) == [Result.RECEIVED, Result.FAILED]
    assert dcm_files(tmp_path) == {"1.2.3.1.dcm"}


def test_what_a_killed_receiver_left_staged_is_removed_at_start(tmp_path):
    left = tmp_path / STAGING / "abc" / "PAT-1" / "1.9.1" / "1.9.1.1"
    left.mkdir(parents=True)
    (left / "1.2.3.1.dcm").write_bytes(b"never acknowledged")

    prepare_inbox(tmp_path)

    assert not (tmp_path / STAGING).exists()


class RecordingForwarder:
    """Stands in for the C-STORE forwarder: what it was given, and when it must refuse."""

    peer = "PACS@127.0.0.1:11112"

    def __init__(self, refuse: str = "") -> None:
        self.refuse = refuse
        self.stored: list = []

    def store(self, path, what: str) -> None:
        if self.refuse and path.name == self.refuse:
            raise ForwardError("the PACS refused it (0xA700)")
        self.stored.append(path)


def test_a_whole_study_is_forwarded_from_the_inbox_once_placed_and_a_refusal_is_not_acknowledged(tmp_path):
    data = {str(pk): dicom_bytes("CT", instance_number=pk) for pk in range(1, 4)}
    portal = Portal(data)
    forwarder = RecordingForwarder(refuse="1.2.3.3.dcm")
    client = httpx.Client(base_url="http://portal.test", transport=httpx.MockTransport(portal.handler))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = handle_batch(
            client,
            Target(tmp_path, forwarder),
            pool,
            [lease_item(pk, data[str(pk)], study="1.9.1") for pk in (1, 2, 3)],
        )

    assert results == [Result.RECEIVED, Result.RECEIVED, Result.FAILED]
    assert portal.acked == [1, 2]
    assert {p.name for p in forwarder.stored} == {"1.2.3.1.dcm", "1.2.3.2.dcm"}
    assert all(STAGING not in p.parts and p.is_relative_to(tmp_path / "PAT-1" / "1.9.1") for p in forwarder.stored)
