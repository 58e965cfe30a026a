"""Batched uploads: many files per request, each with its own outcome, and single uploads where batches cannot go.

The portal here is a real HTTP server on loopback that reads each multipart body part by
part and answers per part, as the real one does, from a few rules set by the test.
"""

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydicom import dcmread

from agent.batches import MAX_FILES, batch_size, batches
from agent.client import make_client
from agent.config import load_settings
from agent.retry import Ledger, RetryPolicy
from agent.send import Result, send_paths
from agent.spool import Spool
from agent.state import State
from agent.uploads import Drainer
from dicomweb.multipart import MultipartReader, media_type_params
from tests.dicomfiles import dicom_bytes


class FakePortal(ThreadingHTTPServer):
    """Answers uploads: 201 per new SOP Instance UID, 200 again, 409 to `conflicts`, `broken_status` to `broken`."""

    def __init__(self, *, batch_status: int | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.batch_status = batch_status  # answer every multipart body with this, as an older portal would
        self.conflicts: set[str] = set()
        self.broken: set[str] = set()
        self.broken_status = 500
        self.stored: set[str] = set()
        self.requests: list[tuple[str, int, str]] = []  # (kind, files, query)
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @staticmethod
    def uid(data: bytes) -> str | None:
        try:
            return str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        except Exception:  # noqa: BLE001 - whatever it is, it is not DICOM
            return None

    def answer(self, data: bytes) -> tuple[int, dict]:
        uid = self.uid(data)
        if uid is None:
            return 400, {"error": "This is not a DICOM Part-10 file."}
        if uid in self.broken:
            return self.broken_status, {}
        if uid in self.conflicts:
            return 409, {"error": f"SOP Instance UID {uid} is already stored with different content."}
        with self.lock:
            status = 200 if uid in self.stored else 201
            self.stored.add(uid)
        return status, {"sop_instance_uid": uid}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers["Content-Length"]))
        path, _, query = self.path.partition("?")
        media_type, params = media_type_params(self.headers.get("Content-Type", ""))
        portal = self.server
        if media_type == "multipart/related":
            parts = [part.read() for part in MultipartReader(io.BytesIO(data), params["boundary"])]
            portal.requests.append(("batch", len(parts), query))
            if portal.batch_status is not None:
                return self._send(portal.batch_status, {"error": "Unsupported media type."})
            if any(portal.uid(part) in portal.broken for part in parts):
                return self._send(portal.broken_status, {})  # as a failed transaction: none of the batch is kept
            answers = [portal.answer(part) for part in parts]
            return self._send(200, {"results": [{"status": status, **body} for status, body in answers]})
        portal.requests.append(("single", 1, query))
        status, body = portal.answer(data)
        self._send(status, body)

    def do_GET(self) -> None:
        self._send(200, {"status": "ok"})

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def portal():
    servers = []

    def start(**kwargs) -> FakePortal:
        server = FakePortal(**kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def client_for(portal: FakePortal):
    return make_client(load_settings({"server": portal.url, "key": "k"}, {}), connections=4)


def files_in(folder: Path, count: int) -> dict[str, Path]:
    """`count` DICOM files by SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    found = {}
    for n in range(count):
        uid = f"1.2.826.0.1.3680043.8.498.{n + 1}"
        path = folder / f"{n:03d}.dcm"
        path.write_bytes(dicom_bytes("CT", sop_uid=uid, instance_number=n + 1))
        found[uid] = path
    return found


def test_files_are_cut_into_batches_by_count_and_by_bytes(tmp_path):
    sizes = [10, 10, 10, 30, 5, 100, 1]
    files = []
    for n, size in enumerate(sizes):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(bytes(size))
        files.append(path)
    assert batches(files, max_files=3, max_bytes=40) == [files[0:3], files[3:5], files[5:6], files[6:7]]
    assert batches(files, max_files=2, max_bytes=1000) == [files[0:2], files[2:4], files[4:6], files[6:7]]
    assert batches([]) == []
    # Every connection gets work, within the bound.
    assert (batch_size(1, 4), batch_size(10, 4), batch_size(400, 4)) == (1, 3, MAX_FILES)


def test_a_folder_goes_up_in_batches_and_each_file_keeps_its_own_outcome(portal, tmp_path):
    fake = portal()
    uids = files_in(tmp_path / "out", 12)
    (tmp_path / "out" / "notes.txt").write_text("not an image")
    conflicting = list(uids)[3]
    fake.conflicts.add(conflicting)
    fake.stored.add(list(uids)[5])
    with client_for(fake) as client:
        outcomes = {o.path.name: o for o in send_paths(client, [tmp_path / "out"], parallel=2, priority="stat")}
    assert outcomes["notes.txt"].result is Result.SKIPPED
    assert outcomes[uids[conflicting].name].result is Result.FAILED
    assert outcomes[uids[conflicting].name].status_code == 409
    assert "already stored with different content" in outcomes[uids[conflicting].name].detail
    assert outcomes[uids[list(uids)[5]].name].result is Result.ALREADY_PRESENT
    sent = [name for name, o in outcomes.items() if o.result is Result.SENT]
    assert len(sent) == 10
    assert {kind for kind, _, _ in fake.requests} == {"batch"}
    assert sum(files for _, files, _ in fake.requests) == 12
    assert len(fake.requests) == 2  # two connections, one batch each
    assert {query for _, _, query in fake.requests} == {"priority=stat"}


@pytest.mark.parametrize("status", [404, 405, 415])
def test_against_an_older_portal_it_uploads_file_by_file_and_asks_no_more(portal, tmp_path, status):
    fake = portal(batch_status=status)
    uids = files_in(tmp_path / "out", 6)
    with client_for(fake) as client:
        first = send_paths(client, [tmp_path / "out"], parallel=1)
        again = send_paths(client, [tmp_path / "out"], parallel=1)
    assert [o.result for o in first] == [Result.SENT] * 6
    assert [o.result for o in again] == [Result.ALREADY_PRESENT] * 6
    assert fake.stored == set(uids)
    kinds = [kind for kind, _, _ in fake.requests]
    assert kinds == ["batch"] + ["single"] * 12


def test_a_portal_at_the_same_address_is_asked_again_by_the_next_run(portal, tmp_path):
    fake = portal(batch_status=415)
    files_in(tmp_path / "out", 4)
    with client_for(fake) as client:
        send_paths(client, [tmp_path / "out"], parallel=1)
    fake.batch_status = None  # upgraded in place, as a new portal on a reused port would be
    with client_for(fake) as client:
        again = send_paths(client, [tmp_path / "out"], parallel=1)
    assert [o.result for o in again] == [Result.ALREADY_PRESENT] * 4
    assert [kind for kind, _, _ in fake.requests] == ["batch"] + ["single"] * 4 + ["batch"]


# 502 and 504: behind nginx, a file that kills the web process that reads it.
@pytest.mark.parametrize("status", [500, 502, 504])
def test_a_batch_the_portal_failed_is_sent_again_file_by_file_so_one_bad_file_fails_no_other(portal, tmp_path, status):
    fake = portal()
    fake.broken_status = status
    uids = files_in(tmp_path / "out", 5)
    bad = list(uids)[2]
    fake.broken.add(bad)
    with client_for(fake) as client:
        outcomes = {o.path: o for o in send_paths(client, [tmp_path / "out"], parallel=1, attempts=2)}
    assert outcomes[uids[bad]].result is Result.FAILED and outcomes[uids[bad]].status_code == status
    assert [outcomes[uids[u]].result for u in uids if u != bad] == [Result.SENT] * 4
    assert fake.stored == set(uids) - {bad}
    # The bad file's second attempt is its own; no batch is sent for it again.
    assert [kind for kind, _, _ in fake.requests] == ["batch"] + ["single"] * 5 + ["single"]


def test_the_spool_drains_in_batches(portal, tmp_path):
    fake = portal()
    spool = Spool(tmp_path / "spool")
    for n in range(7):
        spool.put(dicom_bytes("CT", sop_uid=f"1.2.826.0.1.3680043.8.498.{100 + n}"), "1.2.3")
    with client_for(fake) as client:
        drainer = Drainer(
            client,
            spool,
            State(tmp_path),
            stop=threading.Event(),
            interval=1,
            parallel=2,
            policy=RetryPolicy(max_attempts=3, give_up_after=60),
            ledger=Ledger(tmp_path / "retries.json"),
        )
        assert drainer.drain_once() is True
    assert spool.pending() == []
    assert len(fake.stored) == 7
    assert sorted(files for _, files, _ in fake.requests) == [3, 4]
