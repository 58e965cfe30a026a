"""Reading stored instances for DICOMweb: headers as dicom+json, frames, bulk data.

Headers are read up to the pixel data and never further; frames are read at
their offsets in the file (native) or item by item (encapsulated), so a frame
of a 500 MB multi-frame instance costs one frame of memory. Compressed frames
go out exactly as stored: the viewer decodes them, the portal never transcodes.

Stored files are read again here as ingest accepted them, odd ones included
(unknown VRs, values that are not what their VR says): metadata leaves out the
elements that do not convert and falls back to what the index holds for the
identifiers; frames that cannot be located answer FrameNotFound (404) before
any byte is streamed, never a cut-off stream or a 500.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.encaps import generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from routing.models import Instance
from routing.services import instance_open
from studies.dicomread import READ_ERRORS, UnreadableFile, header_read, integer, readable

PIXEL_DATA = 0x7FE00010
# Binary values above this many bytes (base64) become BulkDataURIs.
BULK_THRESHOLD = 1024
_NATIVE = {ImplicitVRLittleEndian, UID("1.2.840.10008.1.2.1"), ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}


class FrameNotFound(LookupError):
    """No such frame or bulk value in the stored file, or none that can be located in it (404)."""


@contextmanager
def instance_file(instance: Instance) -> Iterator[BinaryIO]:
    handle = instance_open(instance)
    try:
        yield handle
    finally:
        handle.close()


def instance_chunks(instance: Instance, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
    """The stored file as it was received, byte for byte."""
    with instance_file(instance) as handle:
        while chunk := handle.read(chunk_size):
            yield chunk


def instance_header(instance: Instance) -> pydicom.Dataset:
    """The header's elements that pydicom can read; none (an empty dataset) when it cannot parse the file."""
    with instance_file(instance) as handle:
        try:
            return readable(header_read(handle, stop_before_pixels=True))
        except UnreadableFile:
            return pydicom.Dataset()


def dataset_json(dataset: pydicom.Dataset, *, instance_url: str) -> dict:
    """The dataset as dicom+json; long binary values become BulkDataURIs on this instance.

    Element by element rather than pydicom's Dataset.to_json_dict: that one
    drops an element it cannot encode only at the top level (a sequence goes
    whole) and logs the failure's message, which may quote a patient's value.
    An element that cannot be encoded, or whose value is no valid JSON (NaN), is
    left out.
    """

    def bulk_uri(element: DataElement) -> str:
        return f"{instance_url}/bulk/{element.tag:08X}"

    document = {}
    for element in dataset:
        if element.VR == "SQ" and isinstance(element.value, Sequence):
            items = [dataset_json(item, instance_url=instance_url) for item in element.value]
            document[f"{element.tag:08X}"] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            continue
        try:
            encoded = element.to_json_dict(bulk_data_element_handler=bulk_uri, bulk_data_threshold=BULK_THRESHOLD)
            json.dumps(encoded, allow_nan=False)
        except READ_ERRORS:
            continue
        document[f"{element.tag:08X}"] = encoded
    return document


def instance_metadata(instance: Instance, *, instance_url: str) -> dict:
    header = instance_header(instance)
    document = dataset_json(header, instance_url=instance_url)
    # A viewer files an instance by these: what the index read at ingest stands in
    # for an element the file has under an unknown VR, or for a file pydicom cannot parse.
    series = instance.series
    for tag, vr, value in (
        (0x00080016, "UI", instance.sop_class_uid),
        (0x00080018, "UI", instance.sop_instance_uid),
        (0x00080060, "CS", series.modality),
        (0x0020000D, "UI", series.study.study_instance_uid),
        (0x0020000E, "UI", series.series_instance_uid),
    ):
        if not document.get(f"{tag:08X}", {}).get("Value"):
            document[f"{tag:08X}"] = {"vr": vr, "Value": [value]}
    if instance.transfer_syntax_uid not in _NATIVE:
        vr = "OB"
    else:
        vr = "OW" if (integer(header, "BitsAllocated") or 16) > 8 else "OB"
    document[f"{PIXEL_DATA:08X}"] = {"vr": vr, "BulkDataURI": f"{instance_url}/bulk/{PIXEL_DATA:08X}"}
    return dict(sorted(document.items()))


@dataclass(frozen=True)
class FrameSource:
    transfer_syntax_uid: str
    number_of_frames: int
    encapsulated: bool


def _frame_size(header: pydicom.Dataset) -> int:
    bits, rows, columns = integer(header, "BitsAllocated"), integer(header, "Rows"), integer(header, "Columns")
    if bits == 1:
        # Bit-packed frames need not start on a byte boundary; only whole-byte ones are served.
        raise FrameNotFound("Frames of 1-bit pixel data are not served one by one.")
    if not bits or not rows or not columns or min(bits, rows, columns) < 0 or bits % 8:
        raise FrameNotFound("The frames cannot be located: Rows, Columns or Bits Allocated is missing or not a number.")
    return rows * columns * max(integer(header, "SamplesPerPixel") or 1, 1) * bits // 8


def frames_read(instance: Instance, numbers: list[int] | None) -> tuple[FrameSource, Iterator[bytes]]:
    """The requested frames (1-based; None for all), in order, as stored."""
    transfer_syntax = instance.transfer_syntax_uid
    with instance_file(instance) as handle:
        try:
            if transfer_syntax == DeflatedExplicitVRLittleEndian:
                # No byte offsets in a deflated file: pydicom inflates it.
                dataset = header_read(handle)
            else:
                dataset = header_read(handle, defer_size=1024)
        except UnreadableFile as exc:
            raise FrameNotFound(f"The frames cannot be located: {exc}") from None
    if PIXEL_DATA not in dataset:
        raise FrameNotFound("This instance has no pixel data.")
    # A frame count that is not a number ("1A") is read as one frame, as the renderer does.
    count = max(integer(dataset, "NumberOfFrames") or 1, 1)
    wanted = numbers if numbers is not None else list(range(1, count + 1))
    for number in wanted:
        if not 1 <= number <= count:
            raise FrameNotFound(f"Frame {number} does not exist: the instance has {count} frame(s).")
    encapsulated = transfer_syntax not in _NATIVE
    source = FrameSource(transfer_syntax_uid=transfer_syntax, number_of_frames=count, encapsulated=encapsulated)
    raw = dataset.get_item(PIXEL_DATA, keep_deferred=True)
    offset = raw.value_tell if isinstance(raw, RawDataElement) and raw.value is None else None
    if not encapsulated:
        size = _frame_size(dataset)
        length = raw.length if isinstance(raw, RawDataElement) else len(_pixel_value(dataset))
        for number in wanted:
            # Checked before the first byte goes out: a frame past the value would read what follows it.
            if number * size > length:
                raise FrameNotFound(f"Frame {number} lies past the end of the Pixel Data ({length} bytes).")
        if offset is None:
            value = _pixel_value(dataset)
            return source, (value[(n - 1) * size : n * size] for n in wanted)
        return source, _native_frames(instance, offset, size, wanted)
    # Read whole before the answer starts: a fragment that does not parse is a 404, not a cut stream.
    return source, iter(_encapsulated_frames(instance, dataset, offset, count, wanted))


def _pixel_value(dataset: pydicom.Dataset) -> bytes:
    try:
        value = dataset.PixelData
    except READ_ERRORS:
        value = None
    if not isinstance(value, bytes | bytearray):
        raise FrameNotFound("The Pixel Data of this instance cannot be read.")
    return bytes(value)


def _native_frames(instance: Instance, offset: int, size: int, wanted: list[int]) -> Iterator[bytes]:
    with instance_file(instance) as handle:
        for number in wanted:
            handle.seek(offset + (number - 1) * size)
            yield handle.read(size)


def _encapsulated_frames(
    instance: Instance, dataset: pydicom.Dataset, offset: int | None, count: int, wanted: list[int]
) -> list[bytes]:
    extended = None
    if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
        try:
            extended = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
        except READ_ERRORS:
            extended = None  # pydicom finds the frames from the fragments themselves
        if not all(isinstance(table, bytes | bytearray) for table in extended or ()):
            extended = None
    remaining = sorted(set(wanted))
    found: dict[int, bytes] = {}
    with instance_file(instance) as handle:
        if offset is None:
            buffer: bytes | BinaryIO = _pixel_value(dataset)
        else:
            handle.seek(offset)
            buffer = handle
        try:
            for number, frame in enumerate(
                generate_frames(buffer, number_of_frames=count, extended_offsets=extended), start=1
            ):
                if number in remaining:
                    found[number] = frame
                    remaining.remove(number)
                if not remaining:
                    break
        except READ_ERRORS as exc:
            # The item framing was checked at ingest; offset tables and frame
            # counts that lie about it are not, and pydicom gives up on them.
            raise FrameNotFound(
                f"The encapsulated pixel data cannot be split into frames ({exc.__class__.__name__})."
            ) from None
    for number in wanted:
        if number not in found:
            raise FrameNotFound(f"Frame {number} could not be read from the encapsulated pixel data.")
    return [found[number] for number in wanted]


def bulk_value(instance: Instance, tag: int) -> bytes:
    """A top-level (or first nested) element's value, for a BulkDataURI other than the pixel data."""
    for element in instance_header(instance).iterall():
        if element.tag == tag and isinstance(element.value, bytes | bytearray):
            return bytes(element.value)
    raise FrameNotFound(f"No bulk data element ({tag >> 16:04X},{tag & 0xFFFF:04X}) in this instance.")
