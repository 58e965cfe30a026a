"""Turn one frame of a DICOM file into a PNG or JPEG a browser can show.

The pipeline is pydicom 3's own (pydicom.pixels), in the order PS3.3 C.11 gives:
decode (pydicom converts YBR_FULL/YBR_FULL_422 and JPEG's YBR to RGB itself, so
color is never converted a second time), then for grayscale the modality LUT or
rescale, the VOI LUT or window, MONOCHROME1 inversion; for PALETTE COLOR the
color LUT. Everything is scaled to 8 bits only at the end.

`render_frame` is pure (no Django) so the DICOMweb views can call it as well;
`render_instance` adds the cache in front of it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, pixel_array
from pydicom.pixels.decoders import RLELosslessDecoder
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from studies.dicomread import READ_ERRORS, UnreadableFile, header_read, integer, number, readable, text, value

if TYPE_CHECKING:
    from routing.models import Instance

# pylibjpeg-rle panics on corrupt RLE segments (a Rust panic, raised as a BaseException
# that no handler should catch); pydicom's own RLE decoder raises a ValueError instead.
if "pylibjpeg" in RLELosslessDecoder.available_plugins:
    RLELosslessDecoder.remove_plugin("pylibjpeg")

FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "jpg": ("JPEG", "image/jpeg")}
JPEG_QUALITY = 90
# Enhanced multi-frame objects keep rescale and window in the functional groups.
_EXTRA_TAGS = [0x52009229, 0x52009230]


# (implicit VR, little endian) as read, for files that lack a meta header.
_ENCODINGS = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


class RenderError(ValueError):
    """The file has no pixel data to show, or not at this frame."""


@dataclass(frozen=True)
class FrameInfo:
    """What the viewer needs to know about an instance's pixels before it asks for them."""

    frames: int
    rows: int
    columns: int
    photometric: str
    grayscale: bool
    window: tuple[float, float] | None


def media_type(fmt: str) -> str:
    return FORMATS[_format(fmt)][1]


def render_frame(
    path_or_file: str | os.PathLike | BinaryIO,
    *,
    frame: int = 0,
    size: int | None = None,
    window: tuple[float, float] | None = None,
    fmt: str = "png",
) -> bytes:
    """One frame as PNG or JPEG bytes.

    `frame` counts from 0. `size` bounds the longer edge (never enlarges). `window`
    is (center, width) in modality units (e.g. Hounsfield) and overrides the
    file's VOI LUT and window; it is ignored for color images.
    """
    fmt = _format(fmt)
    ds, arr = _decode(path_or_file, frame)
    _apply_functional_groups(ds, frame)
    image = Image.fromarray(_to_8bit(arr, ds, window))
    if size is not None:
        if size < 1:
            raise RenderError("size must be a positive number of pixels")
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if FORMATS[fmt][0] == "JPEG":
        image.save(out, "JPEG", quality=JPEG_QUALITY)
    else:
        image.save(out, "PNG", compress_level=3)
    return out.getvalue()


def frame_info(path_or_file: str | os.PathLike | BinaryIO) -> FrameInfo:
    """Frames, dimensions and the file's default window, without decoding any pixels."""
    with _opened(path_or_file) as fp:
        try:
            ds = readable(header_read(fp, stop_before_pixels=True))
        except UnreadableFile as exc:
            raise RenderError(str(exc)) from None
    rows, columns = integer(ds, "Rows"), integer(ds, "Columns")
    if not rows or not columns or rows < 0 or columns < 0:
        raise RenderError("The file has no usable image pixel module (Rows and Columns).")
    _apply_functional_groups(ds, 0)
    photometric = text(ds, "PhotometricInterpretation", "MONOCHROME2").upper()
    grayscale = (integer(ds, "SamplesPerPixel") or 1) == 1 and photometric != "PALETTE COLOR"
    return FrameInfo(
        frames=_frame_count(ds),
        rows=rows,
        columns=columns,
        photometric=photometric,
        grayscale=grayscale,
        window=_file_window(ds) if grayscale else None,
    )


@functools.lru_cache(maxsize=8)
def placeholder(*, size: int, fmt: str, message: str = "No image") -> bytes:
    """A plain grey square that says why no image is shown, for an <img> that would otherwise break."""
    image = Image.new("L", (size, size), 48)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(size // 12, 10))
    box = draw.textbbox((0, 0), message, font=font)
    draw.text(((size - box[2]) / 2, (size - box[3]) / 2), message, fill=200, font=font)
    out = io.BytesIO()
    image.save(out, FORMATS[_format(fmt)][0])
    return out.getvalue()


def _format(fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise RenderError(f"Unknown image format {fmt!r}: use png or jpeg.")
    return fmt


@contextmanager
def _opened(path_or_file: str | os.PathLike | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(path_or_file, str | os.PathLike):
        with open(path_or_file, "rb") as fp:
            yield fp
    else:
        path_or_file.seek(0)
        yield path_or_file


def _frame_count(ds: Dataset) -> int:
    # A frame count that is not a number ("1A") is read as one frame, here and in DICOMweb.
    return max(integer(ds, "NumberOfFrames") or 1, 1)


def _decode(path_or_file: str | os.PathLike | BinaryIO, frame: int) -> tuple[Dataset, np.ndarray]:
    ds = Dataset()
    with _opened(path_or_file) as fp:
        try:
            # Reading through the file (not dcmread) decodes only the one frame,
            # so a 500-frame cine costs one frame's memory.
            return _displayable(ds), pixel_array(fp, ds_out=ds, specific_tags=_EXTRA_TAGS, index=frame)
        except Exception:  # whatever failed is retried on the whole dataset below
            frames = _frame_count(ds) if "Rows" in ds else None
        if frames is not None and not 0 <= frame < frames:
            raise RenderError(f"Frame {frame} does not exist: the image has {frames}.")
        # Deflated files, files without a meta header and a few odd encapsulations
        # only decode from a dataset read whole.
        fp.seek(0)
        try:
            ds = header_read(fp)
        except UnreadableFile as exc:
            raise RenderError(str(exc)) from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise RenderError("The file has no pixel data.")
    if not text(ds.file_meta, "TransferSyntaxUID"):
        ds.file_meta.TransferSyntaxUID = _ENCODINGS.get(ds.original_encoding, ImplicitVRLittleEndian)
    if not 0 <= frame < _frame_count(ds):
        raise RenderError(f"Frame {frame} does not exist: the image has {_frame_count(ds)}.")
    try:
        return _displayable(ds), pixel_array(ds, index=frame)
    except Exception as exc:
        raise RenderError(f"The pixel data cannot be decoded: {exc}") from exc


def _displayable(ds: Dataset) -> Dataset:
    """Leave out what the display pipeline cannot use, so the image still shows without it.

    pydicom's LUT functions read these attributes as single numbers: a rescale
    slope written as a person name or as three values is dropped (no rescale), a
    window that is not a number falls back to the full range (see `_file_window`).
    """
    readable(ds)
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds and number(ds, keyword) is None:
            del ds[keyword]
    for keyword in ("PhotometricInterpretation", "VOILUTFunction"):
        if keyword in ds and not isinstance(ds[keyword].value, str):
            del ds[keyword]
    return ds


def _apply_functional_groups(ds: Dataset, frame: int) -> None:
    """Lift an enhanced object's rescale and window for this frame to the top level, where pydicom reads them."""
    # Only sequences of items: an odd file may carry any of these under another VR.
    groups = [_items(ds, "SharedFunctionalGroupsSequence"), _items(ds, "PerFrameFunctionalGroupsSequence")]
    items = []
    if groups[0]:
        items.append(groups[0][0])
    if groups[1] and frame < len(groups[1]):
        items.append(groups[1][frame])
    for item in items:  # per-frame values override shared ones
        for macro, keywords in (
            ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
        ):
            for values in _items(item, macro):
                for keyword in keywords:
                    if values.get(keyword) is not None:
                        setattr(ds, keyword, values.get(keyword))


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    found = value(ds, keyword)
    return list(found) if isinstance(found, Sequence) else []


def _to_8bit(arr: np.ndarray, ds: Dataset, window: tuple[float, float] | None) -> np.ndarray:
    photometric = text(ds, "PhotometricInterpretation", "MONOCHROME2").upper()
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)[..., :3]
        except READ_ERRORS as exc:
            raise RenderError(f"The palette color lookup table cannot be applied ({exc.__class__.__name__}).") from None
        # Entries are 8 or 16 bits by the descriptor; some 16-bit LUTs only use the
        # low byte, so scale by the largest entry actually used, not the nominal depth.
        return _scale(rgb, 0, 255 if rgb.dtype == np.uint8 or rgb.max() <= 255 else 65535)
    if arr.ndim == 3:
        # RGB (pydicom already converted any YBR): only the bit depth may differ.
        bits = min(max(integer(ds, "BitsStored") or 8, 1), 32)
        return _scale(arr[..., :3], 0, 2**bits - 1)
    try:
        values = apply_modality_lut(arr, ds)
    except READ_ERRORS as exc:
        raise RenderError(f"The modality lookup table cannot be applied ({exc.__class__.__name__}).") from None
    function = text(ds, "VOILUTFunction", "LINEAR")
    if window is not None:
        out = _window(values, window[0], window[1], function)
    elif _voi_lut_usable(ds):
        try:
            lut_out = apply_voi(values, ds)
            lut = np.asarray(ds.VOILUTSequence[0].LUTData)
        except READ_ERRORS as exc:
            raise RenderError(f"The VOI lookup table cannot be applied ({exc.__class__.__name__}).") from None
        out = _scale(lut_out, float(lut.min()), float(lut.max()))
    elif (file_window := _file_window(ds)) is not None:
        out = _window(values, *file_window, function)
    else:
        out = _scale(values, float(values.min()), float(values.max()))
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    # pydicom's windowing, asked for an 8-bit unsigned output range.
    target = Dataset()
    target.PhotometricInterpretation = "MONOCHROME2"
    target.BitsStored = 8
    target.PixelRepresentation = 0
    target.WindowCenter = float(center)
    target.WindowWidth = max(float(width), 1.0)
    target.VOILUTFunction = str(function or "LINEAR").upper()
    if target.VOILUTFunction not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        target.VOILUTFunction = "LINEAR"
    return np.clip(np.rint(apply_windowing(values, target)), 0, 255).astype(np.uint8)


def _file_window(ds: Dataset) -> tuple[float, float] | None:
    # Several windows may be given (VM 1-n); the first is the default view.
    center, width = number(ds, "WindowCenter", first=True), number(ds, "WindowWidth", first=True)
    if center is None or width is None or width <= 0:
        return None
    return center, width


def _voi_lut_usable(ds: Dataset) -> bool:
    items = _items(ds, "VOILUTSequence")
    return bool(items) and items[0].get("LUTDescriptor") is not None and items[0].get("LUTData") is not None


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def cache_key(*, sha256: str, frame: int, size: int | None, window: tuple[float, float] | None, fmt: str) -> str:
    """A render is fully determined by the file's bytes and the parameters."""
    params = f"{sha256}:{frame}:{size}:{window}:{_format(fmt)}"
    return "render:" + hashlib.sha256(params.encode()).hexdigest()


def render_instance(
    instance: Instance,
    *,
    frame: int = 0,
    size: int | None = None,
    window: tuple[float, float] | None = None,
    fmt: str = "png",
) -> bytes:
    """`render_frame` of a stored instance, through the render cache."""
    from django.core.cache import caches

    from routing.services import instance_open

    cache = caches["renders"]
    key = cache_key(sha256=instance.sha256, frame=frame, size=size, window=window, fmt=fmt)
    data = cache.get(key)
    if data is None:
        with instance_open(instance) as fp:
            data = render_frame(fp, frame=frame, size=size, window=window, fmt=fmt)
        cache.set(key, data)
    return data


KEY_ATTRIBUTES = [
    ("PatientName", "Patient"),
    ("PatientID", "Patient ID"),
    ("PatientBirthDate", "Birth date"),
    ("PatientSex", "Sex"),
    ("StudyDate", "Study date"),
    ("StudyDescription", "Study"),
    ("SeriesDescription", "Series"),
    ("Modality", "Modality"),
    ("BodyPartExamined", "Body part"),
    ("InstanceNumber", "Instance"),
    ("SliceLocation", "Slice location"),
    ("SliceThickness", "Slice thickness"),
    ("PixelSpacing", "Pixel spacing"),
    ("KVP", "kVp"),
    ("Manufacturer", "Manufacturer"),
    ("ManufacturerModelName", "Model"),
    ("InstitutionName", "Institution"),
]


def instance_summary(instance: Instance) -> dict:
    """Frames, size, default window and key attributes of a stored instance, cached like renders."""
    from django.core.cache import caches

    from routing.services import instance_open

    cache = caches["renders"]
    key = f"summary:{instance.sha256}"
    summary = cache.get(key)
    if summary is None:
        with instance_open(instance) as fp:
            try:
                info = frame_info(fp)
            except RenderError:
                info = None
            fp.seek(0)
            try:
                ds = readable(header_read(fp, stop_before_pixels=True))
            except UnreadableFile:
                ds = Dataset()  # the page still shows what the index knows
        shown = {keyword: _display(ds.get(keyword)) for keyword, _ in KEY_ATTRIBUTES if keyword in ds}
        attributes = [(label, shown[keyword]) for keyword, label in KEY_ATTRIBUTES if shown.get(keyword)]
        if info is not None:
            attributes.append(("Matrix", f"{info.columns} × {info.rows}"))
            attributes.append(("Photometric", info.photometric))
        ts = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
        if ts is not None:
            attributes.append(("Transfer syntax", getattr(ts, "name", str(ts))))
        summary = {
            "renderable": info is not None,
            "frames": info.frames if info else 0,
            "rows": info.rows if info else 0,
            "columns": info.columns if info else 0,
            "grayscale": info.grayscale if info else False,
            "window": list(info.window) if info and info.window else None,
            "attributes": attributes,
        }
        cache.set(key, summary)
    return summary


def _display(value: object) -> str:
    if value is None or isinstance(value, Dataset):
        return ""
    if isinstance(value, bytes | bytearray):
        # A text attribute whose VR was unknown to pydicom stays bytes: shown as text, not as b'...'.
        value = bytes(value).decode("latin-1")
    if isinstance(value, MultiValue | list | tuple):
        return " \\ ".join(_display(v) for v in value)
    return str(value).replace("^", " ").replace("\x00", "").strip()
