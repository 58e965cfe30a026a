"""Reading what the exchange needs from an uploaded DICOM Part-10 file.

Files come from outside and are often messy, so the header is not handed to
pydicom's reader: that reader loads nested sequences and undefined-length
values whole, recurses once per nesting level and fails in ways no one can
list. Instead one iterative walk checks the framing of the whole dataset
(every element, item and delimiter, into every sequence, up to the pixel
data, and the framing of the pixel data itself) while
holding at most one small value at a time, and keeps only the few top-level
elements the exchange reads. pydicom then decodes those (character sets,
value representations). Every failure is an InvalidDicom with a sentence a
person understands. A deflated dataset is inflated as it is walked, never
held whole or written out, and refused past a bound.
"""

import re
import struct
import zlib
from dataclasses import dataclass
from datetime import date
from types import SimpleNamespace
from typing import BinaryIO

import pydicom
from pydicom.datadict import DicomDictionary, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    UncompressedTransferSyntaxes,
)

# pydicom checks each value it decodes and logs the ones it finds invalid,
# value included: a malformed Patient's Name would reach the log. The portal
# judges only the attributes it needs, with its own messages.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

UID_PATTERN = re.compile(r"^(?=.{1,64}$)[0-9]+(\.[0-9]+)*$")
MODALITY_PATTERN = re.compile(r"^[A-Z0-9_]{1,16}$")
UNDEFINED_LENGTH = 0xFFFFFFFF
_CHUNK = 1024 * 1024
_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
# In implicit VR only the dictionary tells a sequence from other values.
_SEQUENCE_TAGS = {tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ"}
_TRANSFER_SYNTAX = 0x00020010
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
# No header attribute the exchange reads is anywhere near this long; a longer
# value is skipped like any other, so a lying length never costs memory.
_MAX_KEPT_VALUE = 64 * 1024
# Nesting within undefined-length sequences, counted in frames (a sequence and
# its item are two). Real objects nest under ten levels; readers that recurse
# (pydicom among them) fail on files nested a few hundred deep.
MAX_DEPTH = 2 * 64
# Real headers hold thousands of elements, large RT structure sets some hundred
# thousand; the bound keeps a file of millions of empty elements from costing minutes.
MAX_ELEMENTS = 2_000_000
_WANTED = {
    tag_for_keyword(keyword)
    for keyword in (
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "Modality",
        "StudyDescription",
        "SeriesDescription",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "BodyPartExamined",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SeriesNumber",
        "InstanceNumber",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "NumberOfFrames",
        "Rows",
        "Columns",
        "BitsAllocated",
    )
}
# What an executable file starts with: PE (Windows), ELF, Mach-O (both byte
# orders, 32 and 64 bit, universal) and a script's shebang (CVE-2019-11687).
_EXECUTABLE_MAGIC = {
    b"MZ": "PE",
    b"\x7fELF": "ELF",
    b"\xfe\xed\xfa\xce": "Mach-O",
    b"\xfe\xed\xfa\xcf": "Mach-O",
    b"\xce\xfa\xed\xfe": "Mach-O",
    b"\xcf\xfa\xed\xfe": "Mach-O",
    b"\xca\xfe\xba\xbe": "Mach-O",
    b"#!": "script",
}
PREAMBLE_SIZE = 128
# Deflate reaches about 1000:1 on zeros, and a file that inflates like that is
# a bomb for every receiver that opens it. Real deflated DICOM (reports,
# waveforms, images) stays far under this ratio; small files may inflate to the floor.
MAX_INFLATE_RATIO = 100
INFLATE_FLOOR = 64 * 1024 * 1024


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


def preamble_executable(head: bytes) -> str | None:
    """The kind of executable whose header fills a Part-10 preamble, or None.

    A preamble is free for applications (TIFF readers use it), which is what
    lets a file be both a DICOM image and a program (CVE-2019-11687).
    """
    if len(head) < PREAMBLE_SIZE + 4 or head[PREAMBLE_SIZE : PREAMBLE_SIZE + 4] != b"DICM":
        return None
    for magic, kind in _EXECUTABLE_MAGIC.items():
        if head.startswith(magic):
            return kind
    return None


def read_header(path: str, *, max_inflated: int) -> DicomHeader:
    with open(path, "rb") as fp:
        return read_header_stream(fp, max_inflated=max_inflated)


def read_header_stream(fp: BinaryIO, *, max_inflated: int) -> DicomHeader:
    """read_header of an open, seekable file: a spooled upload, or the bytes of a batch part already in memory."""
    size = fp.seek(0, 2)
    fp.seek(0)
    prefix = fp.read(PREAMBLE_SIZE + 4)
    if len(prefix) < PREAMBLE_SIZE + 4 or prefix[PREAMBLE_SIZE:] != b"DICM":
        raise InvalidDicom(
            "This is not a DICOM Part-10 file: the 'DICM' signature after the 128-byte preamble is missing."
        )
    source = _FileSource(fp, size)
    meta = _walk(source, implicit=False, little=True, meta=True)
    transfer_syntax = _transfer_syntax(meta.elements)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        source = _InflatingSource(fp, min(max_inflated, max(INFLATE_FLOOR, size * MAX_INFLATE_RATIO)))
        implicit, little = False, True
    else:
        implicit, little = transfer_syntax == ImplicitVRLittleEndian, transfer_syntax != ExplicitVRBigEndian
    walked = _walk(source, implicit=implicit, little=little)
    if isinstance(source, _InflatingSource):
        # Whatever follows the pixel data inflates within the bound too: a
        # receiver's reader would inflate it all.
        source.drain()
    values = _Values(walked.elements)
    if walked.pixel_length is not None and transfer_syntax in UncompressedTransferSyntaxes:
        _check_pixel_data_length(values, walked.pixel_length)
    return _header_from(values, transfer_syntax)


def _transfer_syntax(elements: dict) -> str:
    raw = elements.get(_TRANSFER_SYNTAX)
    value = raw.value.decode("ascii", "replace").strip("\x00 ") if raw is not None and raw.value else ""
    if not value:
        raise InvalidDicom("The file meta information has no Transfer Syntax UID (0002,0010).")
    if not UID_PATTERN.match(value):
        raise InvalidDicom(f"The Transfer Syntax UID (0002,0010) {value[:80]!r} is not a valid UID.")
    return value


class _FileSource:
    """The file itself: skipping seeks, so a large value is never read.

    A skip past the end is only noticed at the next read (which finds
    nothing) through `overrun`: one call per element less on the hot path.
    """

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self.read = fp.read
        self.tell = fp.tell
        self.seek = fp.seek
        self._size = size

    def skip(self, length: int) -> bool:
        self.seek(length, 1)
        return True

    def overrun(self) -> bool:
        return self.tell() > self._size


class _InflatingSource:
    """A deflated dataset, inflated a chunk at a time as it is walked.

    Skipping inflates and discards, so memory stays at one chunk whatever the
    dataset inflates to; past `limit` inflated bytes it is refused.
    """

    def __init__(self, fp: BinaryIO, limit: int) -> None:
        self._fp = fp
        self._limit = limit
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = b""
        self._offset = 0  # read position in _buffer
        self._consumed = 0  # inflated bytes before _buffer
        self._inflated = 0

    def _more(self) -> bool:
        """Inflate the next chunk into the buffer; False at the end of the deflated stream."""
        while not self._inflater.eof:
            data = self._inflater.unconsumed_tail or self._fp.read(_CHUNK)
            if not data:
                raise InvalidDicom("The deflated dataset is truncated.")
            try:
                out = self._inflater.decompress(data, _CHUNK)
            except zlib.error as exc:
                raise InvalidDicom(f"The deflated dataset is corrupt ({exc}).") from None
            if not out:
                continue
            self._inflated += len(out)
            if self._inflated > self._limit:
                raise InflatedTooLarge(
                    f"The deflated dataset inflates past {self._limit} bytes: this portal inflates a file to at "
                    f"most {MAX_INFLATE_RATIO} times its size (at least {INFLATE_FLOOR} bytes) and never past its "
                    "upload limit."
                )
            self._consumed += self._offset
            self._buffer = self._buffer[self._offset :] + out
            self._offset = 0
            return True
        return False

    def read(self, length: int) -> bytes:
        while len(self._buffer) - self._offset < length and self._more():
            pass
        data = self._buffer[self._offset : self._offset + length]
        self._offset += len(data)
        return data

    def skip(self, length: int) -> bool:
        while length > len(self._buffer) - self._offset:
            length -= len(self._buffer) - self._offset
            self._offset = len(self._buffer)
            if not self._more():
                return False
        self._offset += length
        return True

    def tell(self) -> int:
        return self._consumed + self._offset

    def overrun(self) -> bool:
        return False  # skip() already said so

    def drain(self) -> None:
        while self._more():
            self._offset = len(self._buffer)


@dataclass
class _Walked:
    elements: dict
    pixel_length: int | None = None  # None: no Pixel Data, UNDEFINED_LENGTH: encapsulated


@dataclass
class _Frame:
    """One level of the walk: a dataset (top level or an item), or the items of a sequence."""

    items: bool
    implicit: bool
    tag: int = 0  # the sequence element, for messages
    end: int | None = None  # where a defined-length value ends; None: up to its delimiter
    datasets: bool = True  # items hold datasets (a sequence), not fragments
    first: bool = True


def _walk(source, *, implicit: bool, little: bool, meta: bool = False) -> _Walked:
    """Check the framing of a whole dataset and keep the wanted top-level elements.

    Sequences are walked into, whatever their length, so a receiver's reader
    (which recurses, and reads every item) meets only a structure that holds;
    the walk itself is iterative, one list entry per level. Other values are
    skipped, never read or parsed.
    """
    endian = "<" if little else ">"
    tag_length = struct.Struct(endian + "HHL").unpack
    short_length = struct.Struct(endian + "H").unpack
    long_length = struct.Struct(endian + "L").unpack
    wanted = {_TRANSFER_SYNTAX} if meta else _WANTED
    where = "file meta information" if meta else "dataset"
    walked = _Walked(elements={})
    stack = [_Frame(items=False, implicit=implicit)]
    read, skip, tell = source.read, source.skip, source.tell
    count = 0
    skipped = (0, 0)  # the last value skipped, to name it when it ran past the end
    while True:
        frame = stack[-1]
        if frame.end is not None:
            position = tell()
            if position >= frame.end:
                if position > frame.end:
                    raise InvalidDicom(
                        f"An {'item' if frame.items else 'element'} in the sequence of element {_name(frame.tag)} "
                        f"runs past the end of its {'sequence' if frame.items else 'item'} (a length is wrong)."
                    )
                stack.pop()
                continue
        head = read(8)
        if len(head) < 8:
            if source.overrun():
                raise InvalidDicom(
                    f"The file is truncated: element {_name(skipped[0])} claims {skipped[1]} bytes, "
                    "past the end of the file."
                )
            if not head and len(stack) == 1:
                return walked
            raise InvalidDicom(f"The file is truncated: the {where} ends inside an element or a sequence.")
        count += 1
        if count > MAX_ELEMENTS:
            raise InvalidDicom(f"The {where} holds more than {MAX_ELEMENTS} elements.")
        group, element, length = tag_length(head)
        tag = group << 16 | element
        top = len(stack) == 1
        if meta and group != 0x0002 and top:
            source.seek(-8, 1)
            return walked
        if frame.items:
            if tag == _SEQUENCE_DELIMITER:
                stack.pop()
            elif tag != _ITEM:
                raise InvalidDicom(
                    f"Element {_name(frame.tag)} has an undefined length but holds {_name(tag)} where a sequence item "
                    "belongs: only sequences and encapsulated pixel data may have an undefined length."
                    if frame.first and frame.end is None
                    else f"The sequence in element {_name(frame.tag)} has {_name(tag)} where an item or its "
                    "delimiter belongs (a delimiter is missing, or a length is wrong)."
                )
            elif frame.datasets:
                _descend(stack, frame, None if length == UNDEFINED_LENGTH else tell() + length)
            else:
                skipped = (frame.tag, length)
                if not skip(length):
                    raise InvalidDicom(
                        f"The file is truncated: an item in element {_name(frame.tag)} runs past its end."
                    )
            frame.first = False
            continue
        if group == 0xFFFE:
            if tag == _ITEM_DELIMITER and not top:
                stack.pop()
                continue
            raise InvalidDicom(
                f"An item in the sequence of element {_name(frame.tag)} has no item delimiter (found {_name(tag)})."
                if not top
                else f"The {where} has the sequence tag {_name(tag)} outside any sequence (a length or a delimiter "
                "is wrong)."
            )
        if frame.first:
            frame.first = False
            # Some writers encode in the other VR style than the transfer syntax
            # says; like pydicom, believe the first element of the dataset.
            if top:
                frame.implicit = not _looks_explicit(head)
        vr = None
        element_implicit = frame.implicit
        if not element_implicit:
            if 0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B:
                raw_vr = head[4:6]
                vr = raw_vr.decode("ascii")
                if raw_vr in _LONG_LENGTH_VRS:
                    extra = read(4)
                    if len(extra) < 4:
                        raise InvalidDicom(f"The file is truncated inside the header of element {_name(tag)}.")
                    (length,) = long_length(extra)
                else:
                    (length,) = short_length(head[6:8])
            else:
                # A writer that switched to implicit VR midway: pydicom reads
                # these, so the walk follows.
                element_implicit = True
        if top and tag == _PIXEL_DATA and not meta:
            walked.pixel_length = length
            if length != UNDEFINED_LENGTH:
                if not skip(length) or source.overrun():
                    raise InvalidDicom(
                        f"The file is truncated: the Pixel Data claims {length} bytes, past the end of the file."
                    )
                return walked
            _walk_fragments(source, endian)
            return walked
        if length == UNDEFINED_LENGTH:
            # Only sequences (SQ, or UN holding one) and encapsulated pixel data
            # may have an undefined length, and their value is a list of items.
            stack.append(
                _Frame(items=True, implicit=element_implicit or vr == "UN", tag=tag, datasets=tag != _PIXEL_DATA)
            )
            continue
        if vr == "SQ" or (vr is None and tag in _SEQUENCE_TAGS):
            stack.append(_Frame(items=True, implicit=element_implicit, tag=tag, end=tell() + length))
            continue
        if top and tag in wanted and length <= _MAX_KEPT_VALUE:
            value_tell = tell()
            value = read(length)
            if len(value) < length:
                raise InvalidDicom(f"The file is truncated: element {_name(tag)} runs past the end of the file.")
            walked.elements[BaseTag(tag)] = RawDataElement(
                BaseTag(tag), vr, length, value, value_tell, element_implicit, little
            )
        else:
            skipped = (tag, length)
            if not skip(length):
                raise InvalidDicom(
                    f"The file is truncated: element {_name(tag)} claims {length} bytes, past the end of the file."
                )


def _descend(stack: list, frame: _Frame, end: int | None) -> None:
    """Enter an item of a sequence: its elements are a dataset."""
    if len(stack) > MAX_DEPTH:
        raise InvalidDicom(
            f"Sequences are nested more than {MAX_DEPTH // 2} deep in element {_name(frame.tag)}; "
            "receiving viewers cannot read such a file."
        )
    if end is not None and frame.end is not None and end > frame.end:
        raise InvalidDicom(
            f"An item in the sequence of element {_name(frame.tag)} runs past the end of its sequence "
            "(a length is wrong)."
        )
    stack.append(_Frame(items=False, implicit=frame.implicit, tag=frame.tag, end=end))


def _walk_fragments(source, endian: str) -> None:
    """Encapsulated (compressed) frames: items of defined length up to the delimiter."""
    unpack = struct.Struct(endian + "HHL").unpack
    while True:
        head = source.read(8)
        if len(head) < 8:
            raise InvalidDicom("The file is truncated: the pixel data runs past the end of the file.")
        group, element, length = unpack(head)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            return
        if tag != _ITEM or length == UNDEFINED_LENGTH:
            raise InvalidDicom("The encapsulated pixel data is malformed (expected an item or a delimiter).")
        if not source.skip(length):
            raise InvalidDicom("The file is truncated: the pixel data runs past the end of the file.")


def _looks_explicit(head: bytes) -> bool:
    return 0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B


def _name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _check_pixel_data_length(values: "_Values", length: int) -> None:
    """Native pixel data must hold every pixel the header promises, or no viewer can show it."""
    if length == UNDEFINED_LENGTH:
        return
    try:
        expected = _expected_length(values)
    except _NotPlain:
        expected = _pydicom_expected_length(values.dataset())
    if expected is None:
        return  # an attribute is missing or unreadable: nothing to compare against
    if length < expected:
        frames = values.text("NumberOfFrames") or 1
        shape = (
            f"{values.integer('Rows')} x {values.integer('Columns')} x {values.integer('SamplesPerPixel')}"
            f" x {values.integer('BitsAllocated')}/8 x {frames}"
        )
        raise InvalidDicom(
            f"The Pixel Data holds {length} bytes, but the image it describes needs {expected} bytes "
            f"(Rows x Columns x Samples per Pixel x Bits Allocated/8 x Number of Frames = {shape})."
        )


def _expected_length(values: "_Values") -> int | None:
    """pydicom's get_expected_length, given the image attributes read without a Dataset; _NotPlain where
    one needs pydicom. An attribute the file lacks is left out, as a Dataset would lack it."""
    image = SimpleNamespace()
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated"):
        if (value := values.plain_unsigned(keyword)) is not None:
            setattr(image, keyword, value)
    if frames := values.plain_text("NumberOfFrames"):
        try:
            image.NumberOfFrames = int(frames)
        except ValueError:
            raise _NotPlain from None
    if values.present("PhotometricInterpretation"):
        image.PhotometricInterpretation = values.plain_text("PhotometricInterpretation")
    return _pydicom_expected_length(image)


def _pydicom_expected_length(image: pydicom.Dataset | SimpleNamespace) -> int | None:
    try:
        expected = get_expected_length(image)
    except Exception:
        return None
    return expected if isinstance(expected, int) else None


class _NotPlain(Exception):
    """A value the fast path does not decode: pydicom decodes it."""


# Values in these VRs use the default repertoire whatever the character set.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
# Values in these VRs follow Specific Character Set (0008,0005).
_TEXT_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
# Character sets in which a byte under 0x80 is the ASCII character (no ISO 2022 escapes
# in the value, checked per value): a plain ASCII value reads the same in each.
_ASCII_CHARSETS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6", "ISO_IR 100", "ISO_IR 192", "GB18030", "GBK"})


class _Values:
    """The header's wanted values, as pydicom would give them.

    pydicom's Dataset costs about 30 us per value read (character set lookups,
    value conversion, tag comparisons): most of the header's time. Nearly every
    value the exchange reads is a single plain ASCII string or one unsigned
    short, which decode here in a few bytes' work; any other (a multi-value, a
    non-ASCII byte, an escape, an unexpected VR) goes to pydicom, unchanged.
    """

    def __init__(self, elements: dict) -> None:
        self.elements = elements
        self._dataset: pydicom.Dataset | None = None
        try:
            charset = self.plain_text("SpecificCharacterSet")
        except _NotPlain:
            charset = None
        self.ascii_text = charset in _ASCII_CHARSETS

    def dataset(self) -> pydicom.Dataset:
        if self._dataset is None:
            self._dataset = pydicom.Dataset(self.elements)
        return self._dataset

    def _raw(self, keyword: str) -> RawDataElement | None:
        return self.elements.get(tag_for_keyword(keyword))

    def present(self, keyword: str) -> bool:
        return self._raw(keyword) is not None

    def _vr(self, raw: RawDataElement) -> str:
        if raw.VR is not None:
            return raw.VR
        entry = DicomDictionary.get(raw.tag)
        return entry[0] if entry is not None else "UN"

    def plain_text(self, keyword: str) -> str:
        """The value as text() gives it, or _NotPlain."""
        raw = self._raw(keyword)
        if raw is None or not raw.value:
            return ""
        vr = self._vr(raw)
        if vr not in _ASCII_VRS and not (vr in _TEXT_VRS and self.ascii_text):
            raise _NotPlain
        value = raw.value
        if not value.isascii() or b"\\" in value or b"\x1b" in value:
            raise _NotPlain
        text = value.decode("ascii").rstrip("\0 ")
        return text.strip().replace("\x00", "")

    def plain_integer(self, keyword: str) -> int | None:
        text = self.plain_text(keyword)
        if not text:
            return None
        try:
            return _bounded(int(text))
        except ValueError:
            raise _NotPlain from None

    def plain_unsigned(self, keyword: str) -> int | None:
        raw = self._raw(keyword)
        if raw is None or not raw.value:
            return None
        if self._vr(raw) != "US" or len(raw.value) != 2:
            raise _NotPlain
        return int.from_bytes(raw.value, "little" if raw.is_little_endian else "big")

    def text(self, keyword: str) -> str:
        try:
            return self.plain_text(keyword)
        except _NotPlain:
            pass
        try:
            value = self.dataset().get(keyword)
        except Exception:
            return ""
        if value is None:
            return ""
        if isinstance(value, pydicom.multival.MultiValue):
            value = "\\".join(str(v) for v in value)
        return str(value).strip().replace("\x00", "")

    def integer(self, keyword: str) -> int | None:
        try:
            return self.plain_integer(keyword)
        except _NotPlain:
            pass
        try:
            value = int(str(self.dataset().get(keyword)).strip())
        except Exception:
            return None
        return _bounded(value)


def _bounded(value: int) -> int | None:
    # IS allows twelve digits; the standard (and the database column) only 32 bits.
    return value if -(2**31) <= value < 2**31 else None


def _header_from(values: _Values, transfer_syntax: str) -> DicomHeader:
    text, integer = values.text, values.integer

    def uid(keyword: str, label: str) -> str:
        value = text(keyword)
        if not value:
            raise InvalidDicom(f"The required attribute {label} ({keyword}) is missing or empty.")
        if not UID_PATTERN.match(value):
            raise InvalidDicom(f"{keyword} {value[:80]!r} is not a valid UID (1-64 characters of digits and dots).")
        return value

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
