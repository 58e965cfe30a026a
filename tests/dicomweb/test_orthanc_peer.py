"""Orthanc's own DICOMweb client as a real peer of the portal: STOW as a publisher, QIDO and
retrieve as a subscriber, and the files byte for byte the same at the far end.

Two Debian Orthanc servers with the orthanc-dicomweb plugin, each in a private network
namespace (Orthanc cannot listen on loopback alone). Each reaches the portal through a port
exposed inside its namespace, and the test drives each through its relayed REST port.
"""

import glob
import hashlib
import io
import json
import shutil
import signal
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.dicomfiles import sample_path
from tests.edge.netns import Namespace
from tests.integration.stack import Process, wait_for

# A JPEG one too: the portal never transcodes, so compressed pixel data must come back as sent.
SAMPLES = ("CT_small.dcm", "MR_small.dcm", "SC_rgb_jpeg_dcmtk.dcm")
ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = ("/usr/share/orthanc/plugins*/libOrthancDicomWeb.so*", "/usr/lib/orthanc/libOrthancDicomWeb.so*")


def dicomweb_plugin() -> str:
    found = [path for pattern in DICOMWEB_PLUGIN for path in sorted(glob.glob(pattern))]
    if ORTHANC.exists() and found:
        return found[0]
    if shutil.which("apt-get"):
        pytest.fail("Orthanc and its DICOMweb plugin are needed: apt-get install orthanc orthanc-dicomweb")
    pytest.skip("Orthanc's Debian packages (orthanc, orthanc-dicomweb) cannot be installed on this system")


class OrthancPeer:
    """An Orthanc whose DICOMweb server 'exchange' is the portal, called with one center's key."""

    def __init__(self, stack, folder: Path, *, name: str, key: str, plugin: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.namespace = Namespace()
        portal = f"http://127.0.0.1:{self.namespace.expose(stack.port)}/dicomweb/"
        config = {
            "Name": name,
            "DicomAet": name.upper(),
            "DicomPort": 4242,
            "HttpPort": 8042,
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [plugin],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {"exchange": {"Url": portal, "HttpHeaders": {"Authorization": f"Bearer {key}"}}},
            },
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.url = f"http://127.0.0.1:{self.namespace.relay(8042)}"
        self.process: Process = stack.spawn(
            f"orthanc-{name}", self.namespace.command([str(ORTHANC), "--verbose", str(folder / "orthanc.json")])
        )
        wait_for(self._up, timeout=60, what=f"Orthanc {name}'s REST API")

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/system", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def post(self, path: str, body) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{self.url}{path}", content=content, timeout=120)

    def files(self) -> list[bytes]:
        ids = httpx.get(f"{self.url}/instances", timeout=10).json()
        return [httpx.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30).content for orthanc_id in ids]

    def close(self) -> None:
        self.process.stop(signal.SIGTERM)
        self.namespace.close()


@pytest.fixture
def peers(postgres_stack, pg_network, tmp_path):
    plugin = dicomweb_plugin()
    made = []
    try:
        for name, role in (("publisher", "own"), ("subscriber", "partner")):
            made.append(
                OrthancPeer(postgres_stack, tmp_path / name, name=name, key=pg_network.keys[role], plugin=plugin)
            )
        yield made
    finally:
        for peer in made:
            peer.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def study_uid(data: bytes) -> str:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID


def test_orthanc_publishes_by_stow_and_subscribes_by_qido_and_retrieve_byte_for_byte(postgres_stack, pg_network, peers):
    publisher, subscriber = peers
    originals = [sample_path(name).read_bytes() for name in SAMPLES]
    ids = []
    for data in originals:
        answer = publisher.post("/instances", data)
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["ID"])

    # Orthanc's STOW client: one chunked request, its own 73-character boundary, the key from HttpHeaders.
    stow = publisher.post("/dicom-web/servers/exchange/stow", {"Resources": ids})
    assert stow.status_code == 200, stow.text
    stored = postgres_stack.sql(
        "SELECT i.sha256 FROM routing_instance i JOIN centers_center c ON c.id = i.source_center_id WHERE c.slug = %s",
        f"own-{pg_network.s}",
    )
    assert sorted(row[0] for row in stored) == sorted(map(sha256, originals))

    # The subscriber sees only what was routed to it: wait for the fan-out to queue its deliveries.
    wait_for(
        lambda: (
            postgres_stack.sql(
                "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s",
                f"partner-{pg_network.s}",
            )[0][0]
            == len(originals)
        ),
        timeout=60,
        what="the fan-out to queue the partner's deliveries",
    )

    qido = subscriber.post("/dicom-web/servers/exchange/qido", {"Uri": "/studies"})
    assert qido.status_code == 200, qido.text
    # Orthanc answers in its own JSON: each tag's "Value" is the plain string.
    studies = {study["0020000D"]["Value"] for study in qido.json()}
    assert studies == {study_uid(data) for data in originals}

    retrieve = subscriber.post(
        "/dicom-web/servers/exchange/retrieve", {"Resources": [{"Study": uid} for uid in sorted(studies)]}
    )
    assert retrieve.status_code == 200, retrieve.text
    received = subscriber.files()
    assert sorted(map(sha256, received)) == sorted(map(sha256, originals))
