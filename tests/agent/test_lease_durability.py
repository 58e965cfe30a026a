"""A lease's files are durable before its one ack, with one folder fsync a folder rather than one a file."""

from concurrent.futures import ThreadPoolExecutor

import httpx

from agent import atomic
from agent.receive import Result, Target, handle_batch
from agent.state import State
from tests.agent.test_staging import Portal, lease_item
from tests.dicomfiles import dicom_bytes


def run(portal: Portal, target: Target, batch: list[dict]) -> list[Result]:
    client = httpx.Client(base_url="http://portal.test", transport=httpx.MockTransport(portal.handler))
    with ThreadPoolExecutor(max_workers=4) as pool:
        return handle_batch(client, target, pool, batch)


def a_lease(count: int) -> tuple[Portal, list[dict]]:
    data = {str(pk): dicom_bytes("CT", instance_number=pk) for pk in range(1, count + 1)}
    return Portal(data), [lease_item(int(pk), data[pk], study="1.9.1", deliver="instance") for pk in data]


def test_the_series_folder_is_synced_once_and_before_the_ack(tmp_path, monkeypatch):
    portal, batch = a_lease(5)
    synced = []
    monkeypatch.setattr(atomic, "_fsync_dir", lambda folder: synced.append((folder, list(portal.acked))))

    results = run(portal, Target(tmp_path), batch)

    assert results == [Result.RECEIVED] * 5
    assert portal.acked == [1, 2, 3, 4, 5]
    series = tmp_path / "PAT-1" / "1.9.1" / "1.9.1.1"
    assert [folder for folder, _ in synced].count(series) == 1
    assert all(acked == [] for _, acked in synced)


def test_a_folder_that_cannot_be_synced_acknowledges_none_of_its_files(tmp_path, monkeypatch):
    portal, batch = a_lease(3)
    series = tmp_path / "PAT-1" / "1.9.1" / "1.9.1.1"

    def fsync_dir(folder):
        if folder == series:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic, "_fsync_dir", fsync_dir)

    assert run(portal, Target(tmp_path), batch) == [Result.FAILED] * 3
    assert portal.acked == []


def test_a_lease_records_the_receive_once(tmp_path, monkeypatch):
    portal, batch = a_lease(4)
    state = State(tmp_path / "state")
    writes = []
    monkeypatch.setattr("agent.state.replace_json", lambda path, data: writes.append(data))

    run(portal, Target(tmp_path / "inbox", state=state), batch)

    assert len(writes) == 1
    assert "receive" in writes[0]
