"""Receiving into the inbox and forwarding to the local PACS (dcmtk storescp, Orthanc), and the faults."""

import signal
import subprocess

import pytest

from tests.dicomfiles import dicom_bytes, write_study
from tests.edge.conftest import (
    LEASE_SECONDS,
    agent,
    agent_run,
    dcmtk,
    delivered,
    queued_or_leased,
    wait_for_log,
)
from tests.edge.dicomtools import dataset_bytes, pixel_bytes, sop_uid, transfer_syntax
from tests.integration.stack import wait_for

pytestmark = pytest.mark.integration

INBOX_ERROR = r"ERROR SOP [0-9.]+ \(delivery \d+\): cannot write to the inbox: .*"


def leased_again(stack, center_slug: str) -> bool:
    """Every delivery not yet acknowledged has been leased at least twice: a whole round is over."""
    (fewest,) = stack.sql(
        "SELECT min(attempts) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id "
        "WHERE c.slug = %s AND d.status <> 'delivered'",
        center_slug,
    )[0]
    return fewest is not None and fewest >= 2


def publish(stack, portal: str, key: str, folder) -> None:
    result = agent_run(stack, "--server", portal, "--key", key, "send", str(folder))
    assert result.returncode == 0, result.stdout + result.stderr


def receiver(stack, portal: str, key: str, inbox, *args: str, name: str = "agent-receive"):
    inbox.mkdir(exist_ok=True)
    return agent(
        stack, "--server", portal, "--key", key, "receive", "--inbox", str(inbox), "--wait", "1", *args, name=name
    )


def test_deliveries_are_forwarded_to_storescp_byte_identical(postgres_stack, pg_network, portal, storescp, tmp_path):
    outbox = tmp_path / "outbox"
    study = write_study(outbox, series={"CT": 2, "MR": 1})
    rle = outbox / "rle.dcm"
    (tmp_path / "plain.dcm").write_bytes(dicom_bytes("CT"))
    assert dcmtk("dcmcrle", str(tmp_path / "plain.dcm"), str(rle)).returncode == 0
    publish(postgres_stack, portal, pg_network.keys["own"], outbox)
    process = receiver(
        postgres_stack, portal, pg_network.keys["partner"], tmp_path / "inbox", "--forward", storescp.peer
    )
    try:
        wait_for(lambda: len(storescp.files()) == 4, what="4 files at storescp")
        wait_for(lambda: delivered(postgres_stack, f"partner-{pg_network.s}") == 4, what="4 acknowledged deliveries")
    finally:
        process.stop()
    inbox = {sop_uid(p): p for p in (tmp_path / "inbox").rglob("*.dcm")}
    pacs = {sop_uid(p): p for p in storescp.files()}
    assert set(pacs) == set(inbox) == {*study.values(), sop_uid(rle)}
    for sop, at_pacs in pacs.items():
        # storescp +B writes the dataset exactly as it came over the wire.
        assert dataset_bytes(at_pacs.read_bytes()) == dataset_bytes(inbox[sop].read_bytes())
    assert transfer_syntax(pacs[sop_uid(rle)]) == "1.2.840.10008.1.2.5"
    assert pixel_bytes(pacs[sop_uid(rle)]) == pixel_bytes(rle)
    log = process.log()
    for sop in pacs:
        assert f"SOP {sop} (delivery" in log and f"forwarded to {storescp.peer}" in log


def test_deliveries_are_forwarded_to_orthanc_and_the_inbox_copy_can_be_dropped(
    postgres_stack, pg_network, portal, orthanc, tmp_path
):
    outbox = tmp_path / "outbox"
    (outbox).mkdir()
    (outbox / "j2k.dcm").write_bytes(dicom_bytes("US"))  # pydicom's JPEG 2000 sample
    (outbox / "ct.dcm").write_bytes(dicom_bytes("CT"))
    publish(postgres_stack, portal, pg_network.keys["own"], outbox)
    process = receiver(
        postgres_stack,
        portal,
        pg_network.keys["partner"],
        tmp_path / "inbox",
        "--forward",
        orthanc.peer,
        "--no-keep-inbox",
    )
    try:
        wait_for(lambda: len(orthanc.instances()) == 2, what="2 instances in Orthanc")
        wait_for(lambda: delivered(postgres_stack, f"partner-{pg_network.s}") == 2, what="2 acknowledged deliveries")
    finally:
        process.stop()
    stored = {}
    for orthanc_id in orthanc.instances():
        path = tmp_path / f"{orthanc_id}.dcm"
        path.write_bytes(orthanc.file(orthanc_id))
        stored[sop_uid(path)] = path
    for original in outbox.iterdir():
        at_pacs = stored[sop_uid(original)]
        assert transfer_syntax(at_pacs) == transfer_syntax(original)
        assert pixel_bytes(at_pacs) == pixel_bytes(original)
    assert not list((tmp_path / "inbox").rglob("*.dcm")), "the inbox copy was kept despite --no-keep-inbox"


def test_while_the_pacs_is_down_deliveries_stay_unacknowledged_and_are_retried(
    postgres_stack, pg_network, portal, storescp, tmp_path
):
    storescp.stop()
    study = write_study(tmp_path / "outbox", series={"MR": 2})
    publish(postgres_stack, portal, pg_network.keys["own"], tmp_path / "outbox")
    partner = f"partner-{pg_network.s}"
    process = receiver(
        postgres_stack, portal, pg_network.keys["partner"], tmp_path / "inbox", "--forward", storescp.peer
    )
    try:
        wait_for_log(process, r"not acknowledged")
        # The fan-out runs on the worker: the second delivery may be queued after the first fails.
        wait_for(lambda: queued_or_leased(postgres_stack, partner) == 2, what="both deliveries queued")
        # Leases of LEASE_SECONDS expire and the same deliveries are leased again.
        wait_for(lambda: leased_again(postgres_stack, partner), what="the deliveries to be leased again")
        assert delivered(postgres_stack, partner) == 0
        storescp.start()
        # The agent backs off further with each failed round: up to 30 s, plus a lease.
        wait_for(lambda: len(storescp.files()) == 2, timeout=120, what="2 files at storescp once it is back")
        wait_for(lambda: delivered(postgres_stack, partner) == 2, what="the deliveries acknowledged")
    finally:
        process.stop()
    assert {sop_uid(p) for p in storescp.files()} == set(study.values())


def test_an_agent_killed_while_receiving_leaves_no_partial_file_and_receives_after_restart(
    postgres_stack, pg_network, portal, slow_portal, tmp_path
):
    # 3 MB through a 256 KB/s link: the download is still being written when the agent is killed.
    big = tmp_path / "outbox" / "big.dcm"
    big.parent.mkdir()
    frames = 100
    big.write_bytes(
        dicom_bytes("CT", NumberOfFrames=frames, PixelData=bytes(range(256)) * (128 * 128 * 2 * frames // 256))
    )
    publish(postgres_stack, portal, pg_network.keys["own"], big.parent)
    inbox = tmp_path / "inbox"
    process = receiver(postgres_stack, slow_portal, pg_network.keys["partner"], inbox, name="agent-to-kill")
    partial = wait_for(lambda: list(inbox.rglob(".*.part")), interval=0.05, what="a partial download")
    process.stop(signal.SIGKILL)
    assert partial[0].exists(), "the download had finished before the kill"
    assert not list(inbox.rglob("*.dcm"))
    assert delivered(postgres_stack, f"partner-{pg_network.s}") == 0
    restarted = receiver(postgres_stack, portal, pg_network.keys["partner"], inbox, name="agent-restarted")
    try:
        wait_for_log(restarted, r"removed .*\.part, left half-written")
        [received] = wait_for(lambda: list(inbox.rglob("*.dcm")), timeout=LEASE_SECONDS + 90, what="the delivery")
        wait_for(lambda: delivered(postgres_stack, f"partner-{pg_network.s}") == 1, what="the acknowledgement")
    finally:
        restarted.stop()
    assert received.read_bytes() == big.read_bytes()
    assert not list(inbox.rglob(".*.part"))


def test_a_full_inbox_disk_logs_a_clear_error_acknowledges_nothing_more_and_loses_nothing(
    postgres_stack, pg_network, portal, tmp_path, small_tmpfs
):
    study = write_study(tmp_path / "outbox", series={"CT": 5})
    publish(postgres_stack, portal, pg_network.keys["own"], tmp_path / "outbox")
    partner = f"partner-{pg_network.s}"
    process = receiver(postgres_stack, portal, pg_network.keys["partner"], small_tmpfs)
    try:
        wait_for_log(process, INBOX_ERROR + r"No space left on device.*; not acknowledged")
        # That line comes from one download of the lease; the others are still being placed and
        # the placed ones are acknowledged together afterwards. Once the refused deliveries are
        # leased again that round is over, and what the inbox holds is what was acknowledged.
        wait_for(lambda: leased_again(postgres_stack, partner), what="the refused deliveries to be leased again")

        def settled() -> tuple[list] | None:
            stored = list(small_tmpfs.rglob("*.dcm"))
            if list(small_tmpfs.rglob(".*.part")) or delivered(postgres_stack, partner) != len(stored):
                return None
            return (stored,)

        # Retries go on meanwhile, so between their downloads: no partial file stays behind.
        [stored] = wait_for(settled, what="exactly the files in the full inbox acknowledged, no partial file")
        assert len(stored) < 5
        # Room again: everything arrives, after the agent's back-off (up to 30 s) and a lease.
        subprocess.run(["mount", "-o", "remount,size=10m", str(small_tmpfs)], check=True)
        wait_for(lambda: delivered(postgres_stack, partner) == 5, timeout=120, what="all 5 delivered")
    finally:
        process.stop()
    assert {sop_uid(p) for p in small_tmpfs.rglob("*.dcm")} == set(study.values())
    for original in study:
        [received] = small_tmpfs.rglob(f"{study[original]}.dcm")
        assert received.read_bytes() == original.read_bytes()


def test_an_unwritable_inbox_logs_a_clear_error_and_acknowledges_nothing(
    postgres_stack, pg_network, portal, tmp_path, small_tmpfs
):
    study = write_study(tmp_path / "outbox", series={"MR": 2})
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    publish(postgres_stack, portal, pg_network.keys["own"], tmp_path / "outbox")
    partner = f"partner-{pg_network.s}"
    process = receiver(postgres_stack, portal, pg_network.keys["partner"], small_tmpfs)
    try:
        wait_for_log(process, INBOX_ERROR + r"Read-only file system.*; not acknowledged")
        wait_for(lambda: leased_again(postgres_stack, partner), what="the refused deliveries to be leased again")
        assert delivered(postgres_stack, partner) == 0
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
        wait_for(lambda: delivered(postgres_stack, partner) == 2, timeout=120, what="both delivered once writable")
    finally:
        process.stop()
    assert {sop_uid(p) for p in small_tmpfs.rglob("*.dcm")} == set(study.values())
    for original, sop in study.items():
        [received] = small_tmpfs.rglob(f"{sop}.dcm")
        assert received.read_bytes() == original.read_bytes()
