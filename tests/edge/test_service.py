"""The unattended service: `run` from the example config, outbox watch, heartbeat and status."""

import re
import signal
import socket
import time
from pathlib import Path

import pytest

from agent import __version__
from tests.dicomfiles import dicom_bytes, write_study
from tests.edge.conftest import agent, agent_run, dcmtk, delivered, wait_for_log, wait_for_port
from tests.edge.dicomtools import dataset_bytes, sop_uid
from tests.integration.stack import ROOT, free_port, wait_for

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "agent" / "agent.example.toml"


def configure_example(path: Path, values: dict[tuple[str | None, str], str]) -> Path:
    """The shipped example file with some values changed, exactly as an installer edits it.

    Every key changed must already be in the example, so the example stays complete.
    """
    section = None
    lines = []
    missing = set(values)
    for line in EXAMPLE.read_text().splitlines():
        header = re.fullmatch(r"\[(\w+)\]", line.strip())
        if header:
            section = header.group(1)
        match = re.match(r"(\w+) = ", line)
        if match and (section, match.group(1)) in values:
            line = f"{match.group(1)} = {values[(section, match.group(1))]}"
            missing.discard((section, match.group(1)))
        lines.append(line)
    assert not missing, f"the example config lacks {missing}"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def _quoted(value: object) -> str:
    return f'"{value}"'


def test_run_from_the_example_config_moves_a_study_from_storescu_to_storescp_unattended(
    postgres_stack, pg_network, portal, storescp, tmp_path
):
    """Done when: storescu at one center, the portal in between, storescp at another, no hand on the wheel."""
    scp_port = free_port()
    sending = tmp_path / "shiraz"
    receiving = tmp_path / "tehran"
    for folder in (sending / "state", sending / "outbox", receiving / "state", receiving / "inbox"):
        folder.mkdir(parents=True)
    publisher = configure_example(
        sending / "agent.toml",
        {
            (None, "server"): _quoted(portal),
            (None, "key"): _quoted(pg_network.keys["own"]),
            (None, "state_dir"): _quoted("state"),
            ("run", "roles"): '["scp", "watch"]',
            ("scp", "port"): str(scp_port),
            ("scp", "bind"): _quoted("127.0.0.1"),
            ("scp", "allowed_ae_titles"): '["CT01"]',
            ("watch", "outbox"): _quoted("outbox"),
        },
    )
    subscriber = configure_example(
        receiving / "agent.toml",
        {
            (None, "server"): _quoted(portal),
            (None, "key"): _quoted(pg_network.keys["partner"]),
            (None, "state_dir"): _quoted("state"),
            ("run", "roles"): '["receive", "forward"]',
            ("receive", "inbox"): _quoted("inbox"),
            ("receive", "wait"): "2",
            ("forward", "to"): _quoted(storescp.peer),
        },
    )
    sender = agent(postgres_stack, "run", "--config", str(publisher), name="agent-run-shiraz")
    receiver = agent(postgres_stack, "run", "--config", str(subscriber), name="agent-run-tehran")
    study = write_study(tmp_path / "modality", series={"CT": 3, "MR": 2})
    try:
        wait_for_port(scp_port)
        sent = dcmtk("storescu", "-aet", "CT01", "-aec", "EXCHANGE", "+sd", "127.0.0.1", str(scp_port),
                     str(tmp_path / "modality"))  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_for(lambda: len(storescp.files()) == 5, timeout=90, what="the study at storescp")
        wait_for(lambda: delivered(postgres_stack, f"partner-{pg_network.s}") == 5, what="5 acknowledged deliveries")
    finally:
        sender.stop()
        receiver.stop()
    at_pacs = {sop_uid(p): p for p in storescp.files()}
    assert set(at_pacs) == set(study.values())
    inbox = {p.stem: p for p in (receiving / "inbox").rglob("*.dcm")}
    for sop, path in at_pacs.items():
        assert dataset_bytes(path.read_bytes()) == dataset_bytes(inbox[sop].read_bytes())
    for process in (sender, receiver):
        assert process.popen.returncode == 0, process.log()
        assert "SIGTERM received; stopping" in process.log() and "agent stopped" in process.log()
    assert re.search(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO SOP [0-9.]+ from CT01@127\.0\.0\.1: spooled", sender.log(), re.M
    )
    status = agent_run(postgres_stack, "status", "--config", str(subscriber))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "key accepted for Tehran Hospital" in status.stdout
    assert re.search(r"^inbox: 5 files", status.stdout, re.M)
    assert re.search(r"^last receive: \d{4}-", status.stdout, re.M)


def test_the_outbox_uploads_dropped_files_and_sets_refused_ones_aside_with_a_reason(
    postgres_stack, pg_network, portal, tmp_path
):
    outbox = tmp_path / "outbox"
    (outbox / "study").mkdir(parents=True)
    # Dropped while the agent was not running.
    good = outbox / "study" / "ct.dcm"
    good_bytes = dicom_bytes("CT")
    good.write_bytes(good_bytes)
    truncated = outbox / "truncated.dcm"
    truncated.write_bytes(dicom_bytes("MR")[:2000])
    args = ("--server", portal, "--key", pg_network.keys["own"], "watch", "--outbox", str(outbox))
    process = agent(postgres_stack, *args, "--interval", "1", "--settle", "1", name="agent-watch")
    try:
        wait_for(lambda: (outbox / "sent" / "study" / "ct.dcm").exists(), what="ct.dcm in sent/")
        wait_for(lambda: (outbox / "failed" / "truncated.dcm").exists(), what="truncated.dcm in failed/")
        # The same SOP Instance UID with other bytes: the portal answers 409.
        clash = outbox / "clash.dcm"
        original = (outbox / "sent" / "study" / "ct.dcm").read_bytes()
        clash.write_bytes(original.replace(b"Doe^Jane", b"Doe^John"))
        wait_for(lambda: (outbox / "failed" / "clash.dcm").exists(), what="clash.dcm in failed/")
    finally:
        process.stop()
    assert (outbox / "sent" / "study" / "ct.dcm").read_bytes() == good_bytes
    assert "HTTP 400" in (outbox / "failed" / "truncated.dcm.reason").read_text()
    assert "HTTP 409" in (outbox / "failed" / "clash.dcm.reason").read_text()
    assert sorted(p.name for p in outbox.iterdir()) == ["failed", "sent", "study"]
    assert not list((outbox / "study").iterdir())


def test_a_file_still_being_written_is_not_uploaded_half_done(postgres_stack, pg_network, portal, tmp_path):
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    data = dicom_bytes("CT")
    args = ("--server", portal, "--key", pg_network.keys["own"], "watch", "--outbox", str(outbox))
    process = agent(postgres_stack, *args, "--interval", "1", "--settle", "5", name="agent-watch-slow")
    try:
        wait_for_log(process, r"watching ")
        # A slow copy: a piece every half second for 12 s, longer than the settle time; a pause
        # of the test process shorter than the settle time never lets a half-written file go.
        with (outbox / "slow.dcm").open("wb") as out:
            pieces = [data[i : i + len(data) // 24 + 1] for i in range(0, len(data), len(data) // 24 + 1)]
            for piece in pieces:
                out.write(piece)
                out.flush()
                time.sleep(0.5)
                assert not (outbox / "failed" / "slow.dcm").exists(), "a half-written file was taken"
        wait_for(lambda: (outbox / "sent" / "slow.dcm").exists(), what="slow.dcm in sent/")
    finally:
        process.stop()
    assert (outbox / "sent" / "slow.dcm").read_bytes() == data
    assert not (outbox / "failed").exists() or not list((outbox / "failed").iterdir())


def test_the_portal_shows_the_agent_online_with_its_version_host_and_spool(
    postgres_stack, pg_network, portal, tmp_path
):
    spool = tmp_path / "spool"
    port = free_port()
    args = ("--server", portal, "--key", pg_network.keys["own"], "scp", "--bind", "127.0.0.1", "--port", str(port))
    process = agent(postgres_stack, *args, "--spool", str(spool), name="agent-heartbeat")
    try:
        wait_for_port(port)
        center = f"own-{pg_network.s}"
        rows = wait_for(
            lambda: postgres_stack.sql(
                "SELECT a.version, a.hostname, a.spool_count, a.roles FROM centers_agentheartbeat a "
                "JOIN centers_center c ON c.id = a.center_id WHERE c.slug = %s",
                center,
            ),
            what="a heartbeat row",
        )
    finally:
        process.stop(signal.SIGTERM)
    [(version, hostname, spool_count, roles)] = rows
    assert (version, hostname, spool_count) == (__version__, socket.gethostname(), 0)
    assert "scp" in str(roles)
