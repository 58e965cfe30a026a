"""Reading a stored file again with pydicom, after ingest accepted it.

Ingest stores any file whose framing reads and whose five required attributes
are valid, byte for byte. Everything else in it may be odd: unknown or wrong
VRs, values that are not what their VR says (an IS of "1A", Rows as a person
name), multi-valued rescale slopes. pydicom converts elements lazily, so such
a value only fails where a page or a DICOMweb answer reads it. The helpers here
give those readers what does read and leave out, element by element, what
does not, so one broken element costs that element, never the whole answer.

Exception messages are never logged: pydicom's may quote a value of the file,
a patient's name among them.
"""

import math
import struct
from typing import BinaryIO

from pydicom import Dataset, dcmread
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue

# What pydicom raises while it parses or converts bytes it cannot make sense of
# (seen on the odd-file corpus of tests/studies/test_odd_files.py). Caught only
# around pydicom's own calls on the file's bytes, never around the portal's code.
READ_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    OverflowError,
    EOFError,
    struct.error,
    BytesLengthException,
    InvalidDicomError,
)


class UnreadableFile(ValueError):
    """pydicom cannot parse the stored file's header at all."""


def header_read(fp: BinaryIO, **kwargs) -> Dataset:
    """dcmread of a stored file, or UnreadableFile naming what failed (not the value that did)."""
    try:
        return dcmread(fp, force=True, **kwargs)
    except READ_ERRORS as exc:
        # The file meta group and the Specific Character Set are converted while
        # reading; one of them with an unknown VR stops pydicom's reader itself.
        raise UnreadableFile(f"pydicom cannot read this file's header ({exc.__class__.__name__}).") from None
    except RecursionError:
        raise UnreadableFile("pydicom cannot read this file's header (its sequences nest too deep).") from None
    except OSError as exc:
        if exc.errno is not None:
            raise  # the storage failed, not the file: that is the server's error
        # pydicom's own complaint about the bytes ("No tag to read at file position ...").
        raise UnreadableFile("pydicom cannot read this file's header (OSError).") from None


def readable(dataset: Dataset) -> Dataset:
    """The dataset with every element converted, and those whose value does not convert removed (into sequences)."""
    for tag in list(dataset.keys()):
        try:
            element = dataset[tag]
        except READ_ERRORS:
            del dataset[tag]
            continue
        if element.VR == "SQ":
            for item in element.value or []:
                readable(item)
    return dataset


def value(dataset: Dataset, keyword: str) -> object:
    """The element's value, or None when it is absent or does not convert."""
    try:
        return dataset.get(keyword)
    except READ_ERRORS:
        return None


def integer(dataset: Dataset, keyword: str) -> int | None:
    """A single whole number (US, IS and the like), or None for anything else."""
    found = value(dataset, keyword)
    if isinstance(found, MultiValue | list | tuple):
        found = found[0] if len(found) == 1 else None
    if isinstance(found, bytes | bytearray) or isinstance(found, float) and not math.isfinite(found):
        return None
    try:
        return int(str(found).strip()) if isinstance(found, str) else int(found)
    except (TypeError, ValueError):
        return None


def number(dataset: Dataset, keyword: str, *, first: bool = False) -> float | None:
    """A single finite number (DS, FD...), or None; `first` takes the first of several (VM 1-n)."""
    found = value(dataset, keyword)
    if isinstance(found, MultiValue | list | tuple):
        found = found[0] if found and (first or len(found) == 1) else None
    if isinstance(found, bytes | bytearray) or found is None:
        return None
    try:
        result = float(found)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def text(dataset: Dataset, keyword: str, default: str = "") -> str:
    """A code string's value (Photometric Interpretation...), or `default`."""
    found = value(dataset, keyword)
    if isinstance(found, MultiValue | list | tuple):
        found = found[0] if found else None
    if found is None or isinstance(found, bytes | bytearray):
        return default
    return str(found).strip() or default
