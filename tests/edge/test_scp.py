"""The agent's DICOM listener against dcmtk's echoscu, storescu and dcmsend, through the real portal."""

import signal
from pathlib import Path

import pytest

from tests.dicomfiles import dicom_bytes, write_study
from tests.edge.conftest import agent, agent_run, dcmtk, delivered, wait_for_log, wait_for_port
from tests.edge.dicomtools import elements, pixel_bytes, sop_uid, transfer_syntax
from tests.integration.stack import free_port, wait_for

pytestmark = pytest.mark.integration

AET = "EXCHANGE"


def start_scp(stack, server: str, key: str, spool: Path, *extra: str):
    port = free_port()
    process = agent(
        stack,
        "--server", server, "--key", key,
        "scp", "--ae-title", AET, "--bind", "127.0.0.1", "--port", str(port), "--spool", str(spool), *extra,
        name="agent-scp",
    )  # fmt: skip
    wait_for_port(port)
    return process, port


def receive_all(stack, server: str, key: str, inbox: Path, count: int) -> list[Path]:
    inbox.mkdir(exist_ok=True)

    def arrived():
        result = agent_run(stack, "--server", server, "--key", key, "receive", "--inbox", str(inbox), "--once")
        assert result.returncode == 0, result.stdout + result.stderr
        files = sorted(inbox.rglob("*.dcm"))
        return files if len(files) >= count else None

    return wait_for(arrived, timeout=90, interval=1, what=f"{count} files in {inbox}")


def test_echoscu_is_answered_and_an_unlisted_calling_ae_title_is_rejected(postgres_stack, pg_network, portal, tmp_path):
    process, port = start_scp(postgres_stack, portal, pg_network.keys["own"], tmp_path / "spool", "--allow-ae", "CT01")
    try:
        allowed = dcmtk("echoscu", "-aet", "CT01", "-aec", AET, "127.0.0.1", str(port))
        assert allowed.returncode == 0, allowed.stderr
        wait_for_log(process, r"C-ECHO from CT01@127\.0\.0\.1")
        refused = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", AET, "127.0.0.1", str(port))
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stdout + refused.stderr
    finally:
        process.stop()


def test_a_connection_from_outside_the_allowed_addresses_is_refused(postgres_stack, pg_network, portal, tmp_path):
    process, port = start_scp(
        postgres_stack, portal, pg_network.keys["own"], tmp_path / "spool", "--allow-address", "10.9.9.0/24"
    )
    try:
        assert dcmtk("echoscu", "-aec", AET, "127.0.0.1", str(port)).returncode != 0
        wait_for_log(process, r"refused a DICOM connection from 127\.0\.0\.1")
    finally:
        process.stop()


def test_a_study_sent_by_storescu_reaches_the_subscribed_center(postgres_stack, pg_network, portal, tmp_path):
    study = write_study(tmp_path / "modality", series={"CT": 3, "MR": 2})
    process, port = start_scp(postgres_stack, portal, pg_network.keys["own"], tmp_path / "spool")
    try:
        sent = dcmtk("storescu", "-aet", "CT01", "-aec", AET, "+sd", "127.0.0.1", str(port), str(tmp_path / "modality"))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        files = receive_all(postgres_stack, portal, pg_network.keys["partner"], tmp_path / "inbox", len(study))
        # Each spooled file is removed just after the portal's 201: wait for that, not for luck.
        wait_for(lambda: not list((tmp_path / "spool").glob("*.dcm")), what="the spool emptied")
    finally:
        process.stop()
    assert {sop_uid(f) for f in files} == set(study.values())
    for original, sop in study.items():
        [received] = [f for f in files if f.name == f"{sop}.dcm"]
        assert elements(received) == elements(original)
    log = process.log()
    for sop in study.values():
        assert f"SOP {sop} from CT01@127.0.0.1: spooled" in log
    assert not list((tmp_path / "spool").glob("*.dcm")), "the spool was not emptied"


def _compressed_files(folder: Path) -> list[Path]:
    """One file per compressed transfer syntax, made by dcmtk where it can, else pydicom's real samples."""
    folder.mkdir()
    made = []
    ct = folder / "ct.dcm"
    ct.write_bytes(dicom_bytes("CT"))
    for name, tool, options in [("jpeg-lossless.dcm", "dcmcjpeg", []), ("rle.dcm", "dcmcrle", [])]:
        ct.write_bytes(dicom_bytes("CT"))  # a new SOP Instance UID for each
        result = dcmtk(tool, *options, str(ct), str(folder / name))
        assert result.returncode == 0, result.stderr
        made.append(folder / name)
    rgb = folder / "rgb.dcm"
    rgb.write_bytes(dicom_bytes("OT", sample="SC_rgb_small_odd.dcm"))
    result = dcmtk("dcmcjpeg", "+eb", str(rgb), str(folder / "jpeg-baseline.dcm"))
    assert result.returncode == 0, result.stderr
    made.append(folder / "jpeg-baseline.dcm")
    for name, sample in [("jpeg2000.dcm", "JPEG2000.dcm"), ("deflated.dcm", "image_dfl.dcm")]:
        (folder / name).write_bytes(dicom_bytes("OT", sample=sample))
        made.append(folder / name)
    ct.unlink()
    rgb.unlink()
    return made


def test_compressed_files_sent_with_dcmsend_arrive_with_identical_compressed_pixel_data(
    postgres_stack, pg_network, portal, tmp_path
):
    files = _compressed_files(tmp_path / "compressed")
    syntaxes = {transfer_syntax(f) for f in files}
    assert syntaxes == {
        "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
        "1.2.840.10008.1.2.5",  # RLE
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.1.99",  # deflated
    }
    process, port = start_scp(postgres_stack, portal, pg_network.keys["own"], tmp_path / "spool")
    try:
        # -dn: never fall back to decompressing; every file travels in its own transfer syntax.
        sent = dcmtk("dcmsend", "-dn", "-aet", "CT01", "-aec", AET, "127.0.0.1", str(port), *map(str, files))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        received = receive_all(postgres_stack, portal, pg_network.keys["partner"], tmp_path / "inbox", len(files))
    finally:
        process.stop()
    by_sop = {sop_uid(f): f for f in received}
    for original in files:
        arrived = by_sop[sop_uid(original)]
        assert transfer_syntax(arrived) == transfer_syntax(original), original.name
        # The compressed pixel data byte for byte, and every other element as it was.
        assert pixel_bytes(arrived) == pixel_bytes(original), original.name
        assert elements(arrived) == elements(original), original.name


def test_with_the_portal_down_the_modality_gets_success_and_the_spool_delivers_later(
    postgres_stack, pg_network, tmp_path
):
    stack = postgres_stack
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    web = stack.start_server(port=port, name="server-that-goes-down")
    web.stop(signal.SIGKILL)
    study = write_study(tmp_path / "modality", series={"CT": 3})
    process, scp_port = start_scp(stack, server, pg_network.keys["own"], tmp_path / "spool")
    try:
        sent = dcmtk("storescu", "-aec", AET, "+sd", "127.0.0.1", str(scp_port), str(tmp_path / "modality"))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert len(list((tmp_path / "spool").glob("*.dcm"))) == 3
        wait_for_log(process, r"spool: \S+ kept for later")
        assert delivered(stack, f"partner-{pg_network.s}") == 0
        stack.start_server(port=port, name="server-back")
        files = receive_all(stack, server, pg_network.keys["partner"], tmp_path / "inbox", 3)
        wait_for(lambda: not list((tmp_path / "spool").glob("*.dcm")), what="the spool emptied")
    finally:
        process.stop()
    assert {sop_uid(f) for f in files} == set(study.values())
    for original, sop in study.items():
        [received] = [f for f in files if f.name == f"{sop}.dcm"]
        assert elements(received) == elements(original)
    assert not list((tmp_path / "spool").glob("*.dcm"))


def test_a_full_spool_disk_refuses_with_out_of_resources_and_loses_nothing(
    postgres_stack, pg_network, tmp_path, small_tmpfs
):
    study = write_study(tmp_path / "modality", series={"CT": 4})
    # No portal at this address: what is accepted has to stay in the spool.
    process, port = start_scp(postgres_stack, f"http://127.0.0.1:{free_port()}", pg_network.keys["own"], small_tmpfs)
    try:
        sent = dcmtk("storescu", "-v", "-aec", AET, "+sd", "127.0.0.1", str(port), str(tmp_path / "modality"))
        wait_for_log(process, r"cannot write to the spool .*No space left on device; refused with Out of Resources")
    finally:
        process.stop()
    assert sent.returncode != 0
    assert "Refused: OutOfResources" in sent.stdout + sent.stderr
    accepted = list(small_tmpfs.glob("*.dcm"))
    assert 0 < len(accepted) < len(study)
    originals = {sop: path for path, sop in study.items()}
    for path in accepted:
        assert elements(path) == elements(originals[sop_uid(path)])
    assert not list(small_tmpfs.glob(".*.part")), "a partial file was left in the spool"
