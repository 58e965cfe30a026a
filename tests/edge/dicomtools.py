"""Byte-level views of DICOM Part-10 files, for "passed through unchanged" checks."""

import struct
from pathlib import Path

import pydicom


def dataset_bytes(data: bytes) -> bytes:
    """Everything after the file meta information: the dataset exactly as encoded."""
    assert data[128:132] == b"DICM", "not a DICOM Part-10 file"
    # (0002,0000) File Meta Information Group Length, explicit VR "UL": 12 bytes, value last.
    tag, vr = data[132:136], data[136:138]
    assert (tag, vr) == (b"\x02\x00\x00\x00", b"UL"), "no meta group length"
    (length,) = struct.unpack("<I", data[140:144])
    return data[144 + length :]


def transfer_syntax(data: bytes | Path) -> str:
    source = data if isinstance(data, Path) else pydicom.filebase.DicomBytesIO(data)
    return str(pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


TRAILING_PADDING = 0xFFFCFFFC


def elements(path: Path) -> dict:
    """The dataset's elements and their values, without Data Set Trailing Padding.

    The padding is the one element a sender may drop in transit (PS3.5 7.1.4, dcmtk does).
    """
    ds = pydicom.dcmread(path)
    return {element.tag: element.value for element in ds if element.tag != TRAILING_PADDING}


def pixel_bytes(path: Path) -> bytes:
    """Pixel Data as encoded: for a compressed file, its fragments exactly as the compressor wrote them."""
    return pydicom.dcmread(path).PixelData
