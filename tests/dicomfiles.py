"""Real DICOM test files: pydicom's own samples, re-identified on demand.

Files are never downloaded: `download=False` keeps the suite offline.
"""

import io
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

# pydicom ships no nuclear medicine image offline: NM instances are its MR
# sample relabelled, which is all routing looks at.
SAMPLES = {"CT": "CT_small.dcm", "MR": "MR_small.dcm", "NM": "MR_small.dcm", "US": "JPEG2000.dcm"}


def sample_path(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"pydicom's test file {name} is not installed")
    return Path(path)


def dicom_bytes(
    modality: str = "CT",
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "PAT-001",
    patient_name: str = "Doe^Jane",
    instance_number: int = 1,
    sample: str | None = None,
    **attributes,
) -> bytes:
    """A real sample file of the modality with the given identity, as Part-10 bytes."""
    ds = pydicom.dcmread(sample_path(sample or SAMPLES[modality]))
    ds.Modality = modality
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.InstanceNumber = instance_number
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def write_study(folder: Path, *, series: dict[str, int], patient_id: str = "PAT-001") -> dict[Path, str]:
    """Write a study with the given {modality: instance count} series; returns {path: sop uid}."""
    study_uid = generate_uid()
    written = {}
    for modality, count in series.items():
        series_uid = generate_uid()
        for number in range(1, count + 1):
            sop_uid = generate_uid()
            path = folder / f"{modality}-{series_uid[-6:]}-{number:03d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(
                dicom_bytes(
                    modality,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_uid=sop_uid,
                    patient_id=patient_id,
                    instance_number=number,
                )
            )
            written[path] = sop_uid
    return written
