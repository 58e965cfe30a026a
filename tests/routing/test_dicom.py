import io
import zlib

import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info

from routing.dicom import InflatedTooLarge, InvalidDicom, preamble_executable, read_header
from tests.dicomfiles import dicom_bytes, sample_path


def write(tmp_path, data: bytes):
    path = tmp_path / "upload.dcm"
    path.write_bytes(data)
    return str(path)


def test_it_reads_the_identity_and_the_patient(tmp_path):
    header = read_header(
        write(tmp_path, dicom_bytes("CT", patient_id="P-1", patient_name="Doe^John")), max_inflated=10**9
    )
    assert header.modality == "CT"
    assert header.patient_id == "P-1"
    assert header.patient_name == "Doe^John"
    assert header.transfer_syntax_uid == "1.2.840.10008.1.2.1"


@pytest.mark.parametrize(
    "sample",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "JPEG2000.dcm",
        "MR_small_RLE.dcm",
        "SC_rgb_jpeg_gdcm.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "image_dfl.dcm",
        "MR_small_jp2klossless.dcm",
        "JPEG-lossy.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "SC_rgb_dcmtk_+eb+cr.dcm",
    ],
)
def test_it_reads_every_common_transfer_syntax(tmp_path, sample):
    header = read_header(str(sample_path(sample)), max_inflated=10**9)
    assert header.sop_instance_uid
    assert header.modality


def test_it_rejects_a_file_without_the_part10_signature(tmp_path):
    with pytest.raises(InvalidDicom, match="not a DICOM Part-10 file"):
        read_header(write(tmp_path, b"hello, this is a text file" * 10), max_inflated=10**9)


def test_it_rejects_a_truncated_file(tmp_path):
    data = dicom_bytes("CT")
    with pytest.raises(InvalidDicom, match="truncated"):
        read_header(write(tmp_path, data[: len(data) // 2]), max_inflated=10**9)


def test_it_rejects_pydicoms_own_truncated_samples():
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        with pytest.raises(InvalidDicom, match="truncated"):
            read_header(str(sample_path(name)), max_inflated=10**9)


@pytest.mark.parametrize(
    "keyword", ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"]
)
def test_it_names_a_missing_required_attribute(tmp_path, keyword):
    with pytest.raises(InvalidDicom, match=keyword):
        read_header(write(tmp_path, dicom_bytes("CT", **{keyword: None})), max_inflated=10**9)


@pytest.mark.parametrize("uid", ["1.2.abc", "1.2..3", "1." + "2" * 70, ".1.2"])
def test_it_rejects_an_invalid_uid(tmp_path, uid):
    with pytest.raises(InvalidDicom, match="not a valid UID"):
        read_header(write(tmp_path, dicom_bytes("CT", StudyInstanceUID=uid)), max_inflated=10**9)


def test_it_never_inflates_a_deflated_file_past_the_limit(tmp_path):
    header = read_header(str(sample_path("image_dfl.dcm")), max_inflated=10**9)
    assert header.transfer_syntax_uid == "1.2.840.10008.1.2.1.99"
    with pytest.raises(InflatedTooLarge):
        read_header(str(sample_path("image_dfl.dcm")), max_inflated=1000)


def test_it_bounds_a_deflate_bomb(tmp_path):
    """A few kilobytes that would inflate to a gigabyte are refused after the limit, not inflated."""
    meta = pydicom.dcmread(sample_path("image_dfl.dcm")).file_meta
    prefix = io.BytesIO()
    prefix.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(prefix, meta)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(b"\x00" * (64 * 1024 * 1024)) + compressor.flush()
    assert len(bomb) < 100_000
    path = write(tmp_path, prefix.getvalue() + bomb)
    with pytest.raises(InflatedTooLarge):
        read_header(path, max_inflated=1024 * 1024)


def resaved(tmp_path, name: str, **changes) -> str:
    """A sample saved again by pydicom, so every element length matches its value."""
    dataset = pydicom.dcmread(sample_path(name))
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    path = tmp_path / f"resaved-{name}"
    dataset.save_as(path, enforce_file_format=True)
    return str(path)


def test_it_refuses_native_pixel_data_shorter_than_the_image_naming_both_sizes(tmp_path):
    """pydicom's MR_truncated.dcm saved again: consistent lengths, 8130 bytes of pixels for a 64 x 64 16-bit image."""
    with pytest.raises(InvalidDicom, match=r"holds 8130 bytes, .* needs 8192 bytes .*64 x 64 x 1 x 16/8 x 1"):
        read_header(resaved(tmp_path, "MR_truncated.dcm"), max_inflated=10**9)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("liver_1frame.dcm", 32768),  # 1-bit: 512 x 512 bits packed in bytes
        ("SC_rgb_32bit_2frame.dcm", 240000),  # two frames of 32-bit RGB
        ("SC_ybr_full_422_uncompressed.dcm", 20000),  # two bytes a pixel in 4:2:2
        ("MR_small_bigendian.dcm", 8192),
    ],
)
def test_it_refuses_short_pixel_data_in_every_native_layout(tmp_path, name, expected):
    data = pydicom.dcmread(sample_path(name)).PixelData
    with pytest.raises(InvalidDicom, match=f"holds {expected - 2} bytes, .* needs {expected} bytes"):
        read_header(resaved(tmp_path, name, PixelData=data[:-2]), max_inflated=10**9)


def test_it_refuses_short_pixel_data_in_a_deflated_file(tmp_path):
    data = pydicom.dcmread(sample_path("image_dfl.dcm")).PixelData
    with pytest.raises(InvalidDicom, match="holds 262142 bytes"):
        read_header(resaved(tmp_path, "image_dfl.dcm", PixelData=data[:-2]), max_inflated=10**9)


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "emri_small.dcm",  # 10 frames
        "SC_rgb_2frame.dcm",
        "SC_rgb_32bit_2frame.dcm",
        "liver.dcm",  # 3 frames of 1-bit segments
        "liver_1frame.dcm",
        "SC_ybr_full_422_uncompressed.dcm",
        "image_dfl.dcm",
    ],
)
def test_it_reads_native_pixel_data_that_fits_its_image(name):
    assert read_header(str(sample_path(name)), max_inflated=10**9).sop_instance_uid


def test_it_does_not_measure_compressed_pixel_data_against_the_image():
    """Encapsulated frames are as long as the codec makes them."""
    assert read_header(str(sample_path("JPEG2000.dcm")), max_inflated=10**9).sop_instance_uid


@pytest.mark.parametrize(
    "preamble, kind",
    [
        (b"MZ\x90\x00", "PE"),
        (b"\x7fELF\x02\x01\x01", "ELF"),
        (b"\xcf\xfa\xed\xfe", "Mach-O"),
        (b"#!/bin/sh\n", "script"),
        (b"II*\x00", None),  # a TIFF header: the dual-format use the preamble is for
        (b"", None),
    ],
)
def test_it_names_an_executable_header_in_the_preamble(preamble, kind):
    data = dicom_bytes("CT")
    assert preamble_executable(preamble + data[len(preamble) :]) == kind


def test_it_only_looks_for_executables_in_a_part10_preamble():
    assert preamble_executable(b"MZ" + bytes(200)) is None
