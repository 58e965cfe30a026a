"""Byte-level surgery on real DICOM files, for the malformed-upload and fuzz tests.

Element positions come from pydicom's own element generator, not from the
portal's reader, so the tests do not take the reader's word for the framing.
"""

import io
import struct
import zlib
from dataclasses import dataclass

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from tests.dicomfiles import sample_path

LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class Element:
    start: int  # offset of the tag
    value: int  # offset of the value
    tag: int
    vr: str | None
    length: int
    little: bool

    @property
    def length_offset(self) -> int:
        return self.value - (4 if self.vr is None or self.vr in LONG_LENGTH_VRS else 2)

    @property
    def length_size(self) -> int:
        return 4 if self.vr is None or self.vr in LONG_LENGTH_VRS else 2


def elements(data: bytes) -> list[Element]:
    """The top-level elements of a (not deflated) Part-10 file, file meta first, up to and with the Pixel Data."""
    fp = io.BytesIO(data)
    fp.seek(132)
    found = []
    for raw in data_element_generator(fp, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2):
        found.append(_element(raw, implicit=False, little=True))
    syntax = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    implicit, little = syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
    fp.seek(found[-1].value + found[-1].length)
    for raw in data_element_generator(fp, implicit, little, defer_size=0):
        element = _element(raw, implicit=implicit, little=little)
        found.append(element)
        if element.tag == PIXEL_DATA:
            break
    return found


def _element(raw, *, implicit: bool, little: bool) -> Element:
    if isinstance(raw, RawDataElement):
        implicit, value, length = raw.is_implicit_VR, raw.value_tell, raw.length
    else:  # an undefined-length sequence, which pydicom parses as it goes
        value, length = raw.file_tell, 0xFFFFFFFF
    header = 8 if implicit or raw.VR not in LONG_LENGTH_VRS else 12
    return Element(value - header, value, int(raw.tag), None if implicit else raw.VR, length, little)


def header_end(data: bytes) -> int:
    """Where the Pixel Data element starts (the end of the header)."""
    return elements(data)[-1].start


def with_length(data: bytes, element: Element, length: int) -> bytes:
    """The file with one element's length field overwritten (in place, nothing moves)."""
    fmt = ("<" if element.little else ">") + ("L" if element.length_size == 4 else "H")
    length &= 0xFFFFFFFF if element.length_size == 4 else 0xFFFF
    out = bytearray(data)
    out[element.length_offset : element.value] = struct.pack(fmt, length)
    return bytes(out)


def with_vr(data: bytes, element: Element, vr: bytes) -> bytes:
    out = bytearray(data)
    out[element.start + 4 : element.start + 6] = vr
    return bytes(out)


def sample(name: str) -> bytes:
    return sample_path(name).read_bytes()


def part10(meta: pydicom.Dataset, dataset_bytes: bytes, preamble: bytes = bytes(128)) -> bytes:
    """A Part-10 file from a file meta dataset and the dataset's bytes as given."""
    out = io.BytesIO()
    out.write(preamble + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    out.write(dataset_bytes)
    return out.getvalue()


def encoded(dataset: pydicom.Dataset, *, implicit: bool, little: bool = True) -> bytes:
    """The dataset's elements encoded in the given VR style, whatever its file meta says."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    write_dataset(fp, dataset)
    return fp.getvalue()


def explicit_element(tag: int, vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    """One explicit VR little endian element; `length` overrides the length field."""
    length = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr.decode() in LONG_LENGTH_VRS:
        return head + b"\x00\x00" + struct.pack("<L", length) + value
    return head + struct.pack("<H", length) + value


def item(value: bytes = b"", *, undefined: bool = False) -> bytes:
    if undefined:
        return struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + value + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(value)) + value


SEQUENCE_DELIMITER = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def inserted_before_pixels(data: bytes, extra: bytes) -> bytes:
    """An explicit VR little endian file with `extra` element bytes just before its Pixel Data."""
    at = header_end(data)
    return data[:at] + extra + data[at:]


def deflated_stream(chunks) -> bytes:
    """Raw deflate of the given byte chunks, compressed as they come (never joined in memory)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [compressor.compress(chunk) for chunk in chunks]
    out.append(compressor.flush())
    return b"".join(out)


def zeros(total: int, chunk: int = 1024 * 1024):
    block = bytes(chunk)
    while total > 0:
        yield block[: min(chunk, total)]
        total -= chunk


def deflated_meta(dataset: pydicom.Dataset) -> pydicom.Dataset:
    meta = pydicom.dcmread(sample_path("CT_small.dcm")).file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    return meta
