"""The agent's edge parts without a portal: config, spool, outbox readiness, and the listener with a real SCU."""

import os
import time

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from agent.config import ConfigError, load_settings, parse_peer
from agent.scp import StoreListener
from agent.send import Outcome, Result
from agent.spool import Spool
from agent.uploads import Verdict, verdict
from agent.watch import Outbox
from tests.dicomfiles import dicom_bytes, sample_path

BASE = {"server": "https://x.example.org", "key": "k"}


def test_the_example_config_parses_with_every_role(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "agent" / "agent.example.toml"
    config = tmp_path / "agent.toml"
    config.write_text(example.read_text())
    config.chmod(0o600)
    settings = load_settings({"config": config}, {})
    assert settings.roles == ("scp", "watch", "receive")
    assert (settings.ae_title, settings.port, settings.forward) == ("EXCHANGE", 11112, "PACS@192.168.1.10:104")
    assert settings.spool == Path("/var/lib/exchange-agent/spool")


@pytest.mark.parametrize(
    ("text", "parts"),
    [("PACS@10.0.0.5:104", ("PACS", "10.0.0.5", 104)), ("ORTHANC@[::1]:4242", ("ORTHANC", "::1", 4242))],
)
def test_a_dicom_peer_is_written_aet_at_host_colon_port(text, parts):
    assert parse_peer(text) == parts


@pytest.mark.parametrize("text", ["PACS@host", "host:104", "@host:104", "PACS@host:0", "A_TITLE_LONGER_THAN_16@h:1"])
def test_a_malformed_dicom_peer_is_explained(text):
    with pytest.raises(ConfigError, match="AET@host:port|AE title"):
        load_settings({**BASE, "forward": text}, {})


def test_an_unknown_role_is_refused():
    with pytest.raises(ConfigError, match="unknown role 'pacs'"):
        load_settings({**BASE, "roles": ["pacs"]}, {})


def test_the_spool_hands_out_files_oldest_first_and_sets_refused_ones_aside(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.claim()
    first = spool.put(b"one", "1.2.3")
    second = spool.put(b"two", "1.2.4")
    assert spool.pending() == [first, second]
    moved = spool.set_aside(first, "HTTP 400: truncated")
    assert moved.parent == spool.failed
    assert (spool.failed / f"{moved.name}.reason").read_text() == "HTTP 400: truncated\n"
    assert spool.pending() == [second]
    assert (spool.stats().count, spool.stats().bytes, spool.stats().failed) == (1, 3, 1)


def test_a_spool_already_in_use_by_another_process_is_refused(tmp_path):
    Spool(tmp_path).claim()
    with pytest.raises(Exception, match="another agent process"):
        Spool(tmp_path).claim()


@pytest.mark.parametrize(
    ("outcome", "portal_up", "expected"),
    [
        (Outcome(None, Result.SENT, "", 201), False, Verdict.DONE),
        (Outcome(None, Result.ALREADY_PRESENT, "", 200), False, Verdict.DONE),
        (Outcome(None, Result.FAILED, "", 409), True, Verdict.REFUSED),
        (Outcome(None, Result.FAILED, "", 413), True, Verdict.REFUSED),
        (Outcome(None, Result.SKIPPED, "not a DICOM file"), True, Verdict.REFUSED),
        # The key, the proxy or the portal as a whole: never the file's fault, whatever the health check says.
        (Outcome(None, Result.FAILED, "", 401), True, Verdict.OUTAGE),
        (Outcome(None, Result.FAILED, "", 429), True, Verdict.OUTAGE),
        (Outcome(None, Result.FAILED, "", 503), True, Verdict.OUTAGE),
        # A 500, or a proxy's 502/504 for this request, or a broken connection: the file's
        # fault only while the portal otherwise works.
        (Outcome(None, Result.FAILED, "", 500), True, Verdict.RETRY),
        (Outcome(None, Result.FAILED, "", 500), False, Verdict.OUTAGE),
        (Outcome(None, Result.FAILED, "", 502), True, Verdict.RETRY),
        (Outcome(None, Result.FAILED, "", 502), False, Verdict.OUTAGE),
        (Outcome(None, Result.FAILED, "", 504), True, Verdict.RETRY),
        (Outcome(None, Result.FAILED, "", 504), False, Verdict.OUTAGE),
        (Outcome(None, Result.FAILED, "ReadError", network=True), True, Verdict.RETRY),
        (Outcome(None, Result.FAILED, "ConnectError", network=True), False, Verdict.OUTAGE),
        (Outcome(None, Result.FAILED, "Permission denied"), False, Verdict.RETRY),
        (Outcome(None, Result.FAILED, "No such file or directory", missing=True), False, Verdict.GONE),
    ],
)
def test_only_a_files_own_failure_counts_against_it(outcome, portal_up, expected):
    assert verdict(outcome, lambda: portal_up) is expected


def test_an_outbox_file_is_ready_only_once_unchanged_across_scans_and_settled(tmp_path):
    outbox = Outbox(tmp_path, settle=0.3)
    outbox.prepare()
    path = tmp_path / "a.dcm"
    path.write_bytes(b"half")
    assert outbox.ready() == []  # first sight
    with path.open("ab") as f:
        f.write(b" and the rest")
    assert outbox.ready() == []  # it changed
    time.sleep(0.4)
    assert outbox.ready() == [path]
    old = tmp_path / "dropped-while-stopped.dcm"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert old not in outbox.ready()  # seen once
    assert old in outbox.ready()
    assert (tmp_path / "sent") not in outbox.candidates()


def _store(port: int, data_path) -> int:
    ae = AE(ae_title="CT01")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="EXCHANGE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(data_path).Status
    finally:
        assoc.release()


def test_the_listener_answers_success_only_after_the_instance_is_in_the_spool(tmp_path):
    spool = Spool(tmp_path / "spool")
    stored = []
    listener = StoreListener(
        spool, ae_title="EXCHANGE", bind="127.0.0.1", port=0, on_stored=lambda: stored.extend(spool.pending())
    )
    listener.start()
    try:
        sop = generate_uid()
        source = tmp_path / "ct.dcm"
        source.write_bytes(dicom_bytes("CT", sop_uid=sop))
        assert _store(listener.port, source) == 0x0000
    finally:
        listener.stop()
    [spooled] = stored  # already on disk when the listener reported it, before the answer
    assert sop in spooled.name
    received, sent = pydicom.dcmread(spooled), pydicom.dcmread(source)
    assert (received.SOPInstanceUID, received.PixelData) == (sent.SOPInstanceUID, sent.PixelData)


def test_the_listener_refuses_with_out_of_resources_when_the_spool_cannot_be_written(tmp_path):
    spool = Spool(tmp_path / "spool")
    listener = StoreListener(spool, ae_title="EXCHANGE", bind="127.0.0.1", port=0)
    listener.start()
    try:
        # A file where the folder was: no write can succeed, whoever runs the test (root ignores modes).
        spool.folder.rename(tmp_path / "gone")
        spool.folder.write_bytes(b"")
        assert _store(listener.port, sample_path("CT_small.dcm")) == 0xA700
    finally:
        listener.stop()
