"""A synthetic demo study: a CT and an MR series of an ellipse phantom, made with pydicom.

Nothing is downloaded. Every UID and byte is derived from fixed inputs, so the study is
the same on every run and publishing it twice finds it "already stored".
"""

import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

PATIENT_NAME = "DEMO^PATIENT"
PATIENT_ID = "DEMO-0001"
STUDY_DATE = "20260301"
STUDY_DESCRIPTION = "Demo head phantom (synthetic)"
SIZE = 128
PIXEL_MM = 1.8
CT_SLICES = 20
MR_SLICES = 12
SLICE_MM = 5.0

# (centre x, centre y, semi-axis a, semi-axis b, angle in degrees, CT value in HU, MR signal):
# a skull, brain, ventricles and two lesions, after the Shepp-Logan head phantom.
ELLIPSES = [
    (0.0, 0.0, 0.69, 0.92, 0, 1000, 200),
    (0.0, -0.018, 0.66, 0.87, 0, 35, 700),
    (0.22, 0.0, 0.11, 0.31, -18, 5, 1600),
    (-0.22, 0.0, 0.16, 0.41, 18, 5, 1600),
    (0.0, 0.35, 0.21, 0.25, 0, 60, 1000),
    (0.06, -0.6, 0.046, 0.023, 0, 80, 1200),
]


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-exchange:demo")


def uid(*parts: object) -> UID:
    """A UID under 2.25 (a UUID, PS3.5 B.2) named by fixed parts: the same parts always give the same UID."""
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(map(str, parts))).int}")


STUDY_UID = uid("study")


def phantom(*, z: float, column: int) -> np.ndarray:
    """One axial slice at height z in [-1, 1]; column 5 of ELLIPSES gives CT HU, 6 gives MR signal."""
    y, x = np.mgrid[1 : -1 : SIZE * 1j, -1 : 1 : SIZE * 1j]
    air = -1000.0 if column == 5 else 0.0
    image = np.full((SIZE, SIZE), air)
    # The head narrows towards its top and bottom, so slices differ.
    scale = np.sqrt(max(1.0 - z * z, 0.05))
    for cx, cy, a, b, angle, *values in ELLIPSES:
        theta = np.radians(angle)
        dx, dy = x - cx * scale, y - cy * scale
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / (a * scale)
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / (b * scale)
        image[u * u + v * v <= 1.0] = values[column - 5]
    return image


@dataclass(frozen=True)
class Series:
    modality: str
    number: int
    description: str
    slices: int
    sop_class: UID
    window: tuple[int, int]


SERIES = [
    Series("CT", 1, "Axial head 5 mm", CT_SLICES, CTImageStorage, (40, 80)),
    Series("MR", 2, "Axial T2", MR_SLICES, MRImageStorage, (800, 1600)),
]


def _instance(series: Series, index: int) -> Dataset:
    sop_uid = uid(series.modality, index)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = series.sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = series.sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = "DEMO-ACC-1"
    ds.Modality = series.modality
    ds.Manufacturer = "DICOM Exchange demo"
    ds.InstitutionName = "Shiraz Imaging Center"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = STUDY_DESCRIPTION
    ds.SeriesDescription = series.description
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = SLICE_MM
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = uid(series.modality, "series")
    ds.StudyID = "1"
    ds.SeriesNumber = series.number
    ds.InstanceNumber = index + 1
    z_mm = (index - (series.slices - 1) / 2) * SLICE_MM
    ds.ImagePositionPatient = [-SIZE * PIXEL_MM / 2, -SIZE * PIXEL_MM / 2, z_mm]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = uid("frame of reference")
    ds.SliceLocation = z_mm
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = SIZE
    ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.WindowCenter, ds.WindowWidth = series.window
    z = 2 * index / max(series.slices - 1, 1) - 1
    if series.modality == "CT":
        # Stored values are HU + 1024, unsigned, as most scanners write them.
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelRepresentation = 0
        pixels = (phantom(z=z, column=5) + 1024).clip(0, 4095).astype(np.uint16)
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime, ds.EchoTime = 4000, 100
        ds.MagneticFieldStrength = 1.5
        ds.PixelRepresentation = 0
        pixels = phantom(z=z, column=6).clip(0, 4095).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def demo_files() -> Iterator[tuple[str, bytes]]:
    """Each instance of the demo study as (SOP Instance UID, Part-10 bytes), CT first."""
    for series in SERIES:
        for index in range(series.slices):
            ds = _instance(series, index)
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
            yield ds.SOPInstanceUID, out.getvalue()
