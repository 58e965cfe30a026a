import io
import zlib

import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info

from routing.dicom import InflatedTooLarge, InvalidDicom, read_header
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
