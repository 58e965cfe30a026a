"""The paper's data set, generated deterministically from a seed.

723 CT instances of 512x512 16-bit (~0.5 MB), 396 MR of ~38 KB and 59 NM
multi-frame instances of ~80 KB, as valid Part-10 files with realistic headers,
spread over a few patients and studies. Pixels are pseudo-random: nothing on the
path compresses, so their content does not change a figure.
"""

import json
import random
import struct
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    NuclearMedicineImageStorage,
    generate_uid,
)

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1447.1"


@dataclass(frozen=True)
class Kind:
    modality: str
    sop_class: str
    count: int
    rows: int
    columns: int
    frames: int
    studies: int
    body_part: str
    description: str


PAPER = (
    Kind("CT", CTImageStorage, 723, 512, 512, 1, 3, "CHEST", "CT CHEST W/O CONTRAST"),
    Kind("MR", MRImageStorage, 396, 128, 144, 1, 2, "BRAIN", "MRI BRAIN"),
    Kind("NM", NuclearMedicineImageStorage, 59, 64, 64, 10, 1, "WHOLEBODY", "BONE SCAN"),
)
PATIENTS = (
    ("IR-0001", "Rahimi^Maryam", "F", date(1961, 3, 14)),
    ("IR-0002", "Karimi^Reza", "M", date(1975, 11, 2)),
    ("IR-0003", "Ahmadi^Zahra", "F", date(1988, 6, 30)),
)


def uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=[str(seed), *map(str, parts)])


def generate(root: Path, *, seed: int, scale: float = 1.0) -> dict[str, list[Path]]:
    """Write the set under root/<modality>/ (reused when already there) and return the files by modality."""
    manifest = root / "manifest.json"
    wanted = {"seed": seed, "scale": scale, "version": 2}
    if manifest.exists() and json.loads(manifest.read_text()).get("key") == wanted:
        return {m: [root / p for p in paths] for m, paths in json.loads(manifest.read_text())["files"].items()}
    rng = random.Random(seed)
    files: dict[str, list[Path]] = {}
    for kind in PAPER:
        count = max(kind.studies, round(kind.count * scale))
        folder = root / kind.modality
        folder.mkdir(parents=True, exist_ok=True)
        files[kind.modality] = [_write(folder, kind, seed, index, count, rng) for index in range(count)]
    manifest.write_text(
        json.dumps({"key": wanted, "files": {m: [str(p.relative_to(root)) for p in ps] for m, ps in files.items()}})
    )
    return files


def _header(kind: Kind, seed: int, study: int, series: int, index: int, frames: int, rows: int, columns: int):
    patient_id, name, sex, birth = PATIENTS[study % len(PATIENTS)]
    study_date = date(2022, 5, 1) + timedelta(days=study * 3)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = kind.sop_class
    ds.SOPInstanceUID = uid(seed, kind.modality, "instance", study, index)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{8 + study % 10:02d}{index % 60:02d}00"
    ds.AccessionNumber = f"ACC{seed % 1000:03d}{study:02d}{ord(kind.modality[0]):03d}"
    ds.Modality = kind.modality
    ds.Manufacturer = "Bench Medical Systems"
    ds.InstitutionName = "Shiraz Imaging Center"
    ds.ReferringPhysicianName = "Nazari^Ali"
    ds.StudyDescription = kind.description
    ds.SeriesDescription = f"{kind.description} series {series + 1}"
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = sex
    ds.BodyPartExamined = kind.body_part
    ds.SliceThickness = "1.25"
    ds.StudyInstanceUID = uid(seed, kind.modality, "study", study)
    ds.SeriesInstanceUID = uid(seed, kind.modality, "series", study, series)
    ds.StudyID = str(study + 1)
    ds.SeriesNumber = series + 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [-250.0, -250.0, -1.25 * index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = uid(seed, kind.modality, "frame", study)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [0.976562, 0.976562]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_UID
    return ds


def _write(folder: Path, kind: Kind, seed: int, index: int, count: int, rng: random.Random) -> Path:
    per_study = -(-count // kind.studies)
    study, within = divmod(index, per_study)
    series = within * 2 // per_study  # two series per study
    ds = _header(kind, seed, study, series, index, kind.frames, kind.rows, kind.columns)
    path = folder / f"{kind.modality}{index:04d}.dcm"
    pixels = kind.rows * kind.columns * 2 * kind.frames
    _write_with_pixels(path, ds, pixels, lambda n: rng.randbytes(n), pixels)
    return path


def _write_with_pixels(path: Path, ds: Dataset, length: int, chunk, chunk_size: int) -> None:
    """Write the header with pydicom, then stream Pixel Data (OW, explicit VR LE) without holding it whole."""
    ds.save_as(path, enforce_file_format=True)
    with path.open("ab") as out:
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        written = 0
        while written < length:
            block = chunk(min(chunk_size, length - written))
            out.write(block)
            written += len(block)


def big_instance(root: Path, *, seed: int, megabytes: int) -> Path:
    """One multi-frame CT of about `megabytes` MB (512x512 16-bit frames), for the memory figure."""
    frame = 512 * 512 * 2
    frames = max(1, megabytes * 1024 * 1024 // frame)
    path = root / f"big-{seed}-{frames}.dcm"
    if path.exists():
        return path
    kind = PAPER[0]
    ds = _header(kind, seed, 90, 0, frames, frames, 512, 512)
    ds.SOPInstanceUID = uid(seed, "big", frames)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = uid(seed, "big-study", frames)
    ds.SeriesInstanceUID = uid(seed, "big-series", frames)
    rng = random.Random(seed + frames)
    root.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    _write_with_pixels(partial, ds, frame * frames, rng.randbytes, frame)
    partial.replace(path)
    return path
