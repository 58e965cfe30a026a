"""`deidentify: basic` on the real stack: a real worker makes the copies, a real agent receives them.

The received files carry the pseudonym, not the patient, and each one's SHA-256 is
the one its lease announced (the agent acknowledges only matching bytes, and the
portal marks delivered only a matching acknowledgement).
"""

import hashlib
import io
import uuid

import pydicom
import pytest

from tests.dicomfiles import dicom_bytes
from tests.integration.stack import wait_for
from tests.integration.test_exchange import receive_all

pytestmark = pytest.mark.integration

PATIENT_NAME, PATIENT_ID = "MARKER^ZEBRAFISH", "PIDMARKER123"
MARKERS = [b"ZEBRAFISH", PATIENT_ID.encode(), b"Knee after the ski fall"]


def test_a_de_identifying_subscriber_receives_the_pseudonym_verified_by_sha256(stack, tmp_path):
    s = uuid.uuid4().hex[:6]
    stack.load_network(
        f"""
regions:
  - {{slug: fars-{s}, name: Fars {s}, cities: [{{slug: shiraz, name: Shiraz}}]}}
centers:
  - {{slug: own-{s}, name: Shiraz Imaging, city: fars-{s}/shiraz, publish: true, subscribe: false}}
  - {{slug: research-{s}, name: Research Lab, city: fars-{s}/shiraz, publish: false, subscribe: true,
     subscriptions: [{{pattern: "fars-{s}.#", deidentify: basic}}]}}
  - {{slug: hospital-{s}, name: Hospital, city: fars-{s}/shiraz, publish: false, subscribe: true,
     subscriptions: ["fars-{s}.#"]}}
"""
    )
    keys = {role: stack.issue_key(f"{role}-{s}") for role in ("own", "research", "hospital")}
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    originals = {}
    for number in (1, 2):
        data = dicom_bytes(
            "CT",
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id=PATIENT_ID,
            patient_name=PATIENT_NAME,
            instance_number=number,
            StudyDescription="Knee after the ski fall",
        )
        (outbox / f"{number}.dcm").write_bytes(data)
        originals[pydicom.dcmread(outbox / f"{number}.dcm").SOPInstanceUID] = data
    sent = stack.agent(keys["own"], "send", str(outbox))
    assert sent.returncode == 0, sent.stdout + sent.stderr

    inbox = tmp_path / "inbox-research"
    received = receive_all(stack, keys["research"], inbox, 2)
    pseudonyms = set()
    for name, content in received.items():
        assert name.removesuffix(".dcm") not in originals
        for marker in MARKERS + [study_uid.encode(), series_uid.encode(), *(uid.encode() for uid in originals)]:
            assert marker not in content, marker
        ds = pydicom.dcmread(next(inbox.rglob(name)))
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.PatientID != PATIENT_ID
        # The agent files by the lease's patient ID and UIDs: the copy's.
        assert next(inbox.rglob(name)).relative_to(inbox).parts[:3] == (
            ds.PatientID,
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
        )
        pseudonyms.add((ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID))
        assert ds.PixelData == pydicom.dcmread(io.BytesIO(originals[_original_of(stack, ds)])).PixelData
    assert len(pseudonyms) == 1, "one patient, one study, one series at the recipient"

    assert {(uid, sha) for uid, sha, _ in _research_rows(stack, s)} == {
        (name.removesuffix(".dcm"), hashlib.sha256(content).hexdigest()) for name, content in received.items()
    }
    wait_for(
        lambda: {status for _, _, status in _research_rows(stack, s)} == {"delivered"},
        what="the research lab's deliveries acknowledged",
    )

    # A subscriber without de-identification receives the images as published.
    plain = receive_all(stack, keys["hospital"], tmp_path / "inbox-hospital", 2)
    assert set(plain) == {f"{uid}.dcm" for uid in originals}
    assert all(plain[f"{uid}.dcm"] == data for uid, data in originals.items())


def _research_rows(stack, s: str) -> list[tuple]:
    return stack.sql(
        "SELECT i.sop_instance_uid, i.sha256, d.status FROM routing_delivery d "
        "JOIN routing_instance i ON i.id = d.instance_id JOIN centers_center c ON c.id = d.center_id "
        "WHERE c.slug = %s",
        f"research-{s}",
    )


def _original_of(stack, ds: pydicom.Dataset) -> str:
    [(uid,)] = stack.sql(
        "SELECT o.sop_instance_uid FROM routing_instance c JOIN routing_instance o ON o.id = c.derived_from_id "
        "WHERE c.sop_instance_uid = %s",
        ds.SOPInstanceUID,
    )
    return uid
