"""The renderer on every real sample with pixel data that pydicom and pydicom-data ship."""

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from studies.rendering import RenderError, frame_info, render_frame

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DATA_STORE_FILES = Path(pytest.importorskip("data_store").__file__).parent / "data"

# Samples that are broken on purpose (see pydicom's test_files/README.txt): they must
# fail with a clear RenderError, never crash or show garbage.
BROKEN = {
    "JPEG-lossy.dcm": "NM1_JPLY: invalid SOS parameters, superseded by JPGExtended.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm": "codestream bytes overwritten with a delimiter",
    "MR_truncated.dcm": "pixel data cut short",
    "badVR.dcm": "an IS value that is not a number",
}


def _image_samples() -> list[Path]:
    samples = []
    for folder in (PYDICOM_FILES, DATA_STORE_FILES):
        for path in sorted(folder.glob("*.dcm")):
            try:
                ds = pydicom.dcmread(path, force=True)
            except Exception:
                continue
            if "PixelData" in ds and "Rows" in ds:
                samples.append(path)
    return samples


SAMPLES = _image_samples()


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def sample(name: str) -> Path:
    local = PYDICOM_FILES / name
    if local.exists():
        return Path(get_testdata_file(name, download=False))
    return DATA_STORE_FILES / name


def test_the_sample_set_covers_every_photometric_interpretation_and_compression():
    photometrics, syntaxes = set(), set()
    for path in SAMPLES:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        photometrics.add(str(ds.PhotometricInterpretation))
        syntaxes.add(str(ds.file_meta.get("TransferSyntaxUID", "")))
    assert {"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422"} <= photometrics
    # RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, deflate and big endian
    assert {
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
    } <= syntaxes
    assert len(SAMPLES) > 100


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_sample_renders_every_frame_or_fails_clearly(path):
    if path.name in BROKEN:
        with pytest.raises(RenderError):
            render_frame(path)
        return
    info = frame_info(path)
    for frame in sorted({0, info.frames - 1}):
        image = Image.open(io.BytesIO(render_frame(path, frame=frame)))
        assert image.format == "PNG"
        assert image.size == (info.columns, info.rows)
        assert image.mode == ("L" if info.grayscale else "RGB")
        pixels = np.asarray(image)
        # Something is shown: not one flat color (the 3x3 sample has few pixels but many values).
        assert pixels.max() > pixels.min(), "the rendered frame is a single flat color"


def test_a_ct_is_rescaled_to_hounsfield_units_and_windowed_by_the_dicom_formula():
    path = sample("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    center, width = 40.0, 400.0
    expected = np.clip(((hu - (center - 0.5)) / (width - 1) + 0.5) * 255, 0, 255)
    rendered = decoded(render_frame(path, window=(center, width))).astype(float)
    assert np.abs(rendered - expected).max() <= 1
    assert 0 < (rendered == 0).mean() < 1 and (rendered == 255).any()


def test_without_a_window_argument_the_files_own_window_is_used():
    path = sample("693_UNCR.dcm")
    ds = pydicom.dcmread(path)
    own = (float(ds.WindowCenter), float(ds.WindowWidth))
    assert np.array_equal(decoded(render_frame(path)), decoded(render_frame(path, window=own)))
    assert not np.array_equal(decoded(render_frame(path)), decoded(render_frame(path, window=(-600, 1500))))


def test_monochrome1_is_inverted_so_the_lowest_value_is_white():
    path = sample("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "RescaleSlope" not in ds
    rendered = decoded(render_frame(path, window=(float(np.median(raw)), 100)))
    assert rendered[np.unravel_index(raw.argmin(), raw.shape)] == 255
    assert rendered[np.unravel_index(raw.argmax(), raw.shape)] == 0


@pytest.mark.parametrize("compressed", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_jpeg_gdcm.dcm"])
def test_ybr_jpeg_comes_out_in_true_colors_not_converted_twice(compressed):
    # The SC_rgb samples are stripes of 10 rows: red, pink, green, light green, blue, ...
    reference = decoded(render_frame(sample("SC_rgb.dcm"))).astype(int)
    rendered = decoded(render_frame(sample(compressed))).astype(int)
    assert np.abs(rendered - reference).mean() < 8
    red, green, blue = rendered[5, 50], rendered[25, 50], rendered[45, 50]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert green[1] > 200 and green[0] < 60 and green[2] < 60
    assert blue[2] > 200 and blue[0] < 60 and blue[1] < 60


def test_lossless_jpeg_2000_in_ybr_rct_renders_exactly_like_the_uncompressed_rgb():
    assert np.array_equal(decoded(render_frame(sample("US1_J2KR.dcm"))), decoded(render_frame(sample("US1_UNCR.dcm"))))


@pytest.mark.parametrize(
    "variant",
    ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"],
)
def test_lossless_compressions_render_the_same_pixels_as_the_uncompressed_file(variant):
    assert np.array_equal(decoded(render_frame(sample(variant))), decoded(render_frame(sample("MR_small.dcm"))))


def test_16_bit_rgb_is_scaled_down_to_8_bits():
    sixteen = decoded(render_frame(sample("SC_rgb_16bit.dcm")))
    assert np.array_equal(sixteen, decoded(render_frame(sample("SC_rgb.dcm"))))


@pytest.mark.parametrize("name", ["OBXXXX1A.dcm", "OT-PAL-8-face.dcm", "gdcm-US-ALOKA-16.dcm"])
def test_palette_color_applies_the_lut_and_scales_it_to_8_bits(name):
    path = sample(name)
    ds = pydicom.dcmread(path, force=True)  # OT-PAL-8-face has no meta header
    rgb = decoded(render_frame(path)).astype(int)
    assert rgb.shape == (ds.Rows, ds.Columns, 3)
    # Colors, not gray: the channels differ somewhere, and the range is used.
    assert (np.abs(rgb[..., 0] - rgb[..., 1]) > 16).any()
    assert rgb.max() > 200


def test_the_voi_lut_sequence_is_applied_when_the_file_has_one():
    path = sample("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    assert "VOILUTSequence" in ds
    lut = np.asarray(ds.VOILUTSequence[0].LUTData)
    first = int(ds.VOILUTSequence[0].LUTDescriptor[1])
    raw = ds.pixel_array.astype(int)
    expected = (lut[np.clip(raw - first, 0, len(lut) - 1)] - lut.min()) * 255.0 / (lut.max() - lut.min())
    assert np.abs(decoded(render_frame(path)).astype(float) - expected).max() <= 1


def test_an_enhanced_ct_takes_rescale_and_window_from_its_functional_groups():
    path = sample("eCT_Supplemental.dcm")
    assert frame_info(path).window == (49.0, 102.0)
    assert np.array_equal(decoded(render_frame(path)), decoded(render_frame(path, window=(49.0, 102.0))))


def test_frames_of_a_multiframe_image_differ_and_a_missing_frame_is_an_error():
    path = sample("emri_small.dcm")
    assert frame_info(path).frames == 10
    assert not np.array_equal(decoded(render_frame(path, frame=0)), decoded(render_frame(path, frame=9)))
    with pytest.raises(RenderError, match="does not exist"):
        render_frame(path, frame=10)


def test_size_bounds_the_longer_edge_and_jpeg_is_available():
    thumb = Image.open(io.BytesIO(render_frame(sample("JPEG2000.dcm"), size=128, fmt="jpeg")))
    assert thumb.format == "JPEG"
    assert max(thumb.size) == 128
    with pytest.raises(RenderError):
        render_frame(sample("CT_small.dcm"), fmt="gif")


def test_a_file_without_pixel_data_is_not_renderable():
    with pytest.raises(RenderError):
        render_frame(sample("rtplan.dcm"))


def test_an_open_file_renders_like_its_path():
    path = sample("MR_small_RLE.dcm")
    with open(path, "rb") as fp:
        fp.read(10)
        assert render_frame(fp) == render_frame(path)
