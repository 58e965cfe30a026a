"""Reading what the exchange needs from an uploaded DICOM Part-10 file.

Only the header is parsed; pixel data is never loaded. Files come from outside,
so every failure becomes an InvalidDicom with a sentence a person understands,
and a deflated dataset is inflated to disk with a hard bound (pydicom would
inflate it whole in memory).
"""

import re
import struct
import tempfile
import zlib
from dataclasses import dataclass
from datetime import date
from typing import BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

UID_PATTERN = re.compile(r"^(?=.{1,64}$)[0-9]+(\.[0-9]+)*$")
MODALITY_PATTERN = re.compile(r"^[A-Z0-9_]{1,16}$")
UNDEFINED_LENGTH = 0xFFFFFFFF
_CHUNK = 1024 * 1024
_ITEM, _SEQUENCE_DELIMITER = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
_PIXEL_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"}
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


class InvalidDicom(ValueError):
    """The upload is not a usable DICOM instance; the message says why."""


class InflatedTooLarge(ValueError):
    """A deflated dataset inflates past the size limit."""


@dataclass(frozen=True)
class DicomHeader:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    transfer_syntax_uid: str
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: date | None = None
    patient_sex: str = ""
    study_date: date | None = None
    study_time: str = ""
    study_description: str = ""
    accession_number: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part: str = ""
    instance_number: int | None = None


def read_header(path: str, *, max_inflated: int) -> DicomHeader:
    with open(path, "rb") as fp:
        size = fp.seek(0, 2)
        fp.seek(0)
        prefix = fp.read(132)
        if len(prefix) < 132 or prefix[128:132] != b"DICM":
            raise InvalidDicom(
                "This is not a DICOM Part-10 file: the 'DICM' signature after the 128-byte preamble is missing."
            )
        try:
            meta = _read_file_meta_info(fp)
        except Exception as exc:
            raise InvalidDicom(f"The DICOM file meta information cannot be read ({exc}).") from None
        transfer_syntax = str(meta.get("TransferSyntaxUID", "")).strip()
        if not transfer_syntax:
            raise InvalidDicom("The file meta information has no Transfer Syntax UID (0002,0010).")
        implicit = transfer_syntax == ImplicitVRLittleEndian
        little = transfer_syntax != ExplicitVRBigEndian
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            with tempfile.TemporaryFile() as inflated:
                inflated_size = _inflate(fp, inflated, max_inflated)
                inflated.seek(0)
                dataset = _read_dataset(inflated, inflated_size, implicit=False, little=True)
        else:
            dataset = _read_dataset(fp, size, implicit=implicit, little=little)
    return _header_from(dataset, transfer_syntax)


def _inflate(source: BinaryIO, target: BinaryIO, limit: int) -> int:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    written = 0
    try:
        while chunk := source.read(_CHUNK):
            while chunk:
                out = inflater.decompress(chunk, _CHUNK)
                written += len(out)
                if written > limit:
                    raise InflatedTooLarge(f"The deflated dataset inflates past the limit of {limit} bytes.")
                target.write(out)
                chunk = inflater.unconsumed_tail
        target.write(inflater.flush())
    except zlib.error as exc:
        raise InvalidDicom(f"The deflated dataset is corrupt ({exc}).") from None
    if not inflater.eof:
        raise InvalidDicom("The deflated dataset is truncated.")
    return written


def _read_dataset(fp: BinaryIO, size: int, *, implicit: bool, little: bool) -> pydicom.Dataset:
    try:
        dataset = read_dataset(fp, implicit, little, stop_when=_at_pixel_data, defer_size=_CHUNK)
    except Exception as exc:
        raise InvalidDicom(f"The DICOM dataset cannot be parsed ({exc.__class__.__name__}: {exc}).") from None
    for tag in dataset.keys():
        raw = dataset.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.length != UNDEFINED_LENGTH and raw.value_tell + raw.length > size:
            raise InvalidDicom(f"The file is truncated: element {tag} runs past the end of the file.")
    if fp.tell() < size - 8:
        _check_pixel_data_framing(fp, size, little=little)
    return dataset


def _check_pixel_data_framing(fp: BinaryIO, size: int, *, little: bool) -> None:
    """Pixel data is skipped, not read, so check its length fits in the file."""
    endian = "<" if little else ">"
    truncated = InvalidDicom("The file is truncated: the pixel data runs past the end of the file.")
    header = fp.read(8)
    # Some writers switch to implicit VR whatever the transfer syntax says
    # (pydicom copes), so look at the element itself rather than trust it.
    if header[4:6] not in _PIXEL_VRS:
        length = struct.unpack(endian + "L", header[4:8])[0]
    elif header[4:6] in _LONG_LENGTH_VRS:
        extra = fp.read(4)
        if len(extra) < 4:
            raise truncated
        length = struct.unpack(endian + "L", extra)[0]
    else:
        length = struct.unpack(endian + "H", header[6:8])[0]
    if length != UNDEFINED_LENGTH:
        if fp.tell() + length > size:
            raise truncated
        return
    # Encapsulated (compressed) frames: walk the items without reading them.
    while True:
        item = fp.read(8)
        if len(item) < 8:
            raise truncated
        group, element, item_length = struct.unpack(endian + "HHL", item)
        if (group, element) == _SEQUENCE_DELIMITER:
            return
        if (group, element) != _ITEM or item_length == UNDEFINED_LENGTH:
            raise InvalidDicom("The encapsulated pixel data is malformed (expected an item or a delimiter).")
        if fp.tell() + item_length > size:
            raise truncated
        fp.seek(item_length, 1)


def _header_from(dataset: pydicom.Dataset, transfer_syntax: str) -> DicomHeader:
    def text(keyword: str) -> str:
        try:
            value = dataset.get(keyword)
        except Exception:
            return ""
        if value is None:
            return ""
        if isinstance(value, pydicom.multival.MultiValue):
            value = "\\".join(str(v) for v in value)
        return str(value).strip().replace("\x00", "")

    def uid(keyword: str, label: str) -> str:
        value = text(keyword)
        if not value:
            raise InvalidDicom(f"The required attribute {label} ({keyword}) is missing or empty.")
        if not UID_PATTERN.match(value):
            raise InvalidDicom(f"{keyword} {value[:80]!r} is not a valid UID (1-64 characters of digits and dots).")
        return value

    def integer(keyword: str) -> int | None:
        try:
            return int(str(dataset.get(keyword)).strip())
        except (TypeError, ValueError, OverflowError):
            return None
        except Exception:
            return None

    modality = text("Modality").upper()
    if not modality:
        raise InvalidDicom("The required attribute Modality (0008,0060) is missing or empty.")
    if not MODALITY_PATTERN.match(modality):
        raise InvalidDicom(f"Modality {modality[:20]!r} is not a DICOM modality code.")
    return DicomHeader(
        sop_instance_uid=uid("SOPInstanceUID", "SOP Instance UID (0008,0018)"),
        sop_class_uid=uid("SOPClassUID", "SOP Class UID (0008,0016)"),
        study_instance_uid=uid("StudyInstanceUID", "Study Instance UID (0020,000D)"),
        series_instance_uid=uid("SeriesInstanceUID", "Series Instance UID (0020,000E)"),
        modality=modality,
        transfer_syntax_uid=transfer_syntax,
        patient_id=text("PatientID")[:64],
        patient_name=text("PatientName")[:324],
        patient_birth_date=_date(text("PatientBirthDate")),
        patient_sex=text("PatientSex")[:16],
        study_date=_date(text("StudyDate")),
        study_time=text("StudyTime")[:16],
        study_description=text("StudyDescription")[:200],
        accession_number=text("AccessionNumber")[:64],
        series_number=integer("SeriesNumber"),
        series_description=text("SeriesDescription")[:200],
        body_part=text("BodyPartExamined")[:64],
        instance_number=integer("InstanceNumber"),
    )


def _date(value: str) -> date | None:
    digits = value.strip()[:8]
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return None
