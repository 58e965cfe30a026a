"""Reading stored instances for DICOMweb: headers as dicom+json, frames, bulk data.

Headers are read up to the pixel data and never further; frames are read at
their offsets in the file (native) or item by item (encapsulated), so a frame
of a 500 MB multi-frame instance costs one frame of memory. Compressed frames
go out exactly as stored: the viewer decodes them, the portal never transcodes.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.encaps import generate_frames
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from routing.models import Instance
from routing.services import instance_open

PIXEL_DATA = 0x7FE00010
# Binary values above this many bytes (base64) become BulkDataURIs.
BULK_THRESHOLD = 1024
_NATIVE = {ImplicitVRLittleEndian, UID("1.2.840.10008.1.2.1"), ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}


class FrameNotFound(LookupError):
    pass


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
    with instance_file(instance) as handle:
        return pydicom.dcmread(handle, stop_before_pixels=True, force=True)


def dataset_json(dataset: pydicom.Dataset, *, instance_url: str) -> dict:
    """The dataset as dicom+json; long binary values become BulkDataURIs on this instance."""

    def bulk_uri(element: DataElement) -> str:
        return f"{instance_url}/bulk/{element.tag:08X}"

    return dataset.to_json_dict(
        bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk_uri, suppress_invalid_tags=True
    )


def instance_metadata(instance: Instance, *, instance_url: str) -> dict:
    header = instance_header(instance)
    document = dataset_json(header, instance_url=instance_url)
    if instance.transfer_syntax_uid not in _NATIVE:
        vr = "OB"
    else:
        vr = "OW" if int(header.get("BitsAllocated", 16) or 16) > 8 else "OB"
    document[f"{PIXEL_DATA:08X}"] = {"vr": vr, "BulkDataURI": f"{instance_url}/bulk/{PIXEL_DATA:08X}"}
    return dict(sorted(document.items()))


@dataclass(frozen=True)
class FrameSource:
    transfer_syntax_uid: str
    number_of_frames: int
    encapsulated: bool


def _frame_size(header: pydicom.Dataset) -> int:
    bits = int(header.BitsAllocated)
    pixels = int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel", 1) or 1)
    if bits == 1:
        # Bit-packed frames need not start on a byte boundary; only whole-byte ones are served.
        raise FrameNotFound("Frames of 1-bit pixel data are not served one by one.")
    return pixels * bits // 8


def frames_read(instance: Instance, numbers: list[int] | None) -> tuple[FrameSource, Iterator[bytes]]:
    """The requested frames (1-based; None for all), in order, as stored."""
    transfer_syntax = instance.transfer_syntax_uid
    with instance_file(instance) as handle:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            # No byte offsets in a deflated file: pydicom inflates it.
            dataset = pydicom.dcmread(handle, force=True)
        else:
            dataset = pydicom.dcmread(handle, defer_size=1024, force=True)
    if PIXEL_DATA not in dataset:
        raise FrameNotFound("This instance has no pixel data.")
    count = int(dataset.get("NumberOfFrames", 1) or 1)
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
        if offset is None:
            value = dataset.PixelData
            return source, (value[(n - 1) * size : n * size] for n in wanted)
        return source, _native_frames(instance, offset, size, wanted)
    return source, _encapsulated_frames(instance, dataset, offset, count, wanted)


def _native_frames(instance: Instance, offset: int, size: int, wanted: list[int]) -> Iterator[bytes]:
    with instance_file(instance) as handle:
        for number in wanted:
            handle.seek(offset + (number - 1) * size)
            yield handle.read(size)


def _encapsulated_frames(
    instance: Instance, dataset: pydicom.Dataset, offset: int | None, count: int, wanted: list[int]
) -> Iterator[bytes]:
    extended = None
    if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
        extended = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
    remaining = sorted(set(wanted))
    found: dict[int, bytes] = {}
    with instance_file(instance) as handle:
        if offset is None:
            buffer: bytes | BinaryIO = dataset.PixelData
        else:
            handle.seek(offset)
            buffer = handle
        for number, frame in enumerate(
            generate_frames(buffer, number_of_frames=count, extended_offsets=extended), start=1
        ):
            if number in remaining:
                found[number] = frame
                remaining.remove(number)
            if not remaining:
                break
    for number in wanted:
        if number not in found:
            raise FrameNotFound(f"Frame {number} could not be read from the encapsulated pixel data.")
        yield found[number]


def bulk_value(instance: Instance, tag: int) -> bytes:
    """A top-level (or first nested) element's value, for a BulkDataURI other than the pixel data."""
    with instance_file(instance) as handle:
        dataset = pydicom.dcmread(handle, stop_before_pixels=True, force=True)
    for element in dataset.iterall():
        if element.tag == tag and isinstance(element.value, bytes | bytearray):
            return bytes(element.value)
    raise FrameNotFound(f"No bulk data element ({tag >> 16:04X},{tag & 0xFFFF:04X}) in this instance.")
