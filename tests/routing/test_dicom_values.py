"""The header's fast value reader gives what pydicom gives, or hands the value to pydicom."""

import io
import random

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

from routing import dicom
from routing.dicom import InvalidDicom, read_header_stream
from tests.dicomfiles import dicom_bytes


def header_both_ways(data: bytes, monkeypatch):
    """The header read with the fast path, and again with every value left to pydicom."""

    def read():
        try:
            return read_header_stream(io.BytesIO(data), max_inflated=10**9)
        except InvalidDicom as exc:
            return ("refused", str(exc))

    fast = read()
    with monkeypatch.context() as patch:

        def not_plain(self, keyword):
            raise dicom._NotPlain

        patch.setattr(dicom._Values, "plain_text", not_plain)
        patch.setattr(dicom._Values, "plain_unsigned", not_plain)
        slow = read()
    return fast, slow


def with_raw_value(dataset: pydicom.Dataset, keyword: str, value: bytes) -> bytes:
    """The file with `value` as the element's bytes, written as they are (pydicom would check a value it is given)."""
    tag = BaseTag(pydicom.datadict.tag_for_keyword(keyword))
    dataset = dataset.copy()
    dataset._dict[tag] = RawDataElement(tag, TEXT_FIELDS[keyword], len(value), value, 0, False, True)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def pydicom_samples() -> list[str]:
    paths = []
    for path in get_testdata_files("*.dcm"):
        with open(path, "rb") as fp:
            head = fp.read(132)
        if head[128:132] == b"DICM":
            paths.append(path)
    return sorted(paths)


@pytest.mark.parametrize("path", pydicom_samples(), ids=lambda path: path.rsplit("/", 1)[-1])
def test_every_pydicom_sample_reads_the_same_as_through_pydicom(path, monkeypatch):
    with open(path, "rb") as fp:
        data = fp.read()
    fast, slow = header_both_ways(data, monkeypatch)
    assert fast == slow


ODD_TEXT = ["", " ", "\x00", "A ", " A", "A\x00", "A \x00", "A\x00 ", "1.2.3\x00", "1.2.3 ", "A\\B", "A\\", "\\",
            "Doe^John", "Doe^John^^^", "=Doe", "12", "+12", " 7 ", "1.0", "-3", "99999999999", "2020 01 01",
            "x" * 70, "YBR_FULL_422", "CT ", "ct", "A\x00B"]  # fmt: skip
TEXT_FIELDS = {
    "PatientName": "PN",
    "PatientID": "LO",
    "StudyDescription": "LO",
    "AccessionNumber": "SH",
    "Modality": "CS",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "SeriesNumber": "IS",
    "InstanceNumber": "IS",
    "PatientSex": "CS",
    "BodyPartExamined": "CS",
    "SOPInstanceUID": "UI",
    "NumberOfFrames": "IS",
    "PhotometricInterpretation": "CS",
}


@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 100", "ISO_IR 13"])
@pytest.mark.parametrize("keyword", sorted(TEXT_FIELDS))
def test_odd_values_read_the_same_as_through_pydicom(keyword, charset, monkeypatch):
    base = pydicom.dcmread(io.BytesIO(dicom_bytes("CT")))
    for value in ODD_TEXT:
        dataset = base.copy()
        if charset is not None:
            dataset.SpecificCharacterSet = charset
        fast, slow = header_both_ways(with_raw_value(dataset, keyword, value.encode("latin-1")), monkeypatch)
        assert fast == slow, (keyword, value)


def test_random_bytes_in_the_wanted_values_read_the_same_as_through_pydicom(monkeypatch):
    generator = random.Random("dicom-values")
    alphabet = b"AZaz09 .^\\=\x00\x1b\x7f\x80\xe9\xff-+"
    base = pydicom.dcmread(io.BytesIO(dicom_bytes("CT")))
    for _ in range(300):
        dataset = base.copy()
        keyword = generator.choice(sorted(TEXT_FIELDS))
        value = bytes(generator.choice(alphabet) for _ in range(generator.randrange(0, 12)))
        if generator.random() < 0.3:
            dataset.SpecificCharacterSet = generator.choice(["ISO_IR 100", "ISO_IR 192", "GB18030", "ISO_IR 144"])
        fast, slow = header_both_ways(with_raw_value(dataset, keyword, value), monkeypatch)
        assert fast == slow, (keyword, value)


@pytest.mark.parametrize(
    "syntax",
    [pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian],
    ids=["implicit-little", "explicit-little", "explicit-big"],
)
def test_the_image_size_reads_the_same_as_through_pydicom_in_every_encoding(syntax, monkeypatch):
    base = pydicom.dcmread(io.BytesIO(dicom_bytes("CT")))
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    for frames, pixels in ((None, 1200), (b"2", 2400), (b"2 ", 2398), (b"0", 1200), (b"x", 10), (b"99999999999", 10)):
        dataset = pydicom.Dataset(base)
        dataset.file_meta = base.file_meta.copy()
        dataset.file_meta.TransferSyntaxUID = syntax
        dataset.Rows, dataset.Columns, dataset.BitsAllocated, dataset.SamplesPerPixel = 300, 2, 16, 1
        dataset.PixelData = bytes(pixels)
        if frames is not None:
            tag = BaseTag(pydicom.datadict.tag_for_keyword("NumberOfFrames"))
            dataset._dict[tag] = RawDataElement(tag, "IS", len(frames), frames, 0, implicit, little)
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, dataset, enforce_file_format=True, implicit_vr=implicit, little_endian=little)
        fast, slow = header_both_ways(buffer.getvalue(), monkeypatch)
        assert fast == slow, (frames, pixels)


@pytest.mark.parametrize(
    "keyword", ["Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames", "PhotometricInterpretation"]
)
def test_an_image_attribute_the_file_lacks_is_judged_as_through_pydicom(keyword, monkeypatch):
    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes("CT")))
    dataset.NumberOfFrames = "1"
    delattr(dataset, keyword)
    dataset.PixelData = dataset.PixelData[:-100]
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    fast, slow = header_both_ways(buffer.getvalue(), monkeypatch)
    assert fast == slow
