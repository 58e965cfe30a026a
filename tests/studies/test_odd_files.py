"""Files ingest accepts but that are not conformant, opened by a clinician and a DICOMweb viewer.

Each file is published by our center, routed to the partner, and then every
clinician page and every DICOMweb resource for it is asked for as the partner:
no answer may be a 5xx or a stream that breaks off, a DICOMweb refusal carries
a JSON reason, and every retrieve of the stored file (download, ZIP, WADO-RS,
WADO-URI) gives back the uploaded bytes unchanged. The files are pydicom's own
odd samples and the mutations of tests/routing/test_malformed.py that ingest
stores.
"""

import io
import random
import struct

import pydicom
import pytest

from routing.models import Instance
from tests.dicomfiles import dicom_bytes, sample_path
from tests.routing.dicombytes import (
    PIXEL_DATA,
    elements,
    encoded,
    explicit_element,
    header_end,
    inserted_before_pixels,
    part10,
    sample,
    with_length,
    with_vr,
)
from tests.routing.test_malformed import nested
from tests.studies.oddfiles import Stored, Visit, renamed

pytestmark = pytest.mark.django_db


@pytest.fixture
def odd(agents, clinicians, client, keys):
    """Publish one file and open everything for it as the partner; the list of what went wrong."""
    client.raise_request_exception = False
    clinicians["partner"].raise_request_exception = False

    def publish_and_open(data: bytes, *, stored_as: bytes | None = None, or_refused: bool = False) -> list[str] | None:
        response = agents["own"].upload(data)
        if or_refused and response.status_code != 201:
            assert response.status_code < 500
            return None  # refused at ingest: tests/routing/test_malformed.py's business
        assert response.status_code == 201, response.content[:300]
        instance = Instance.objects.select_related("series__study").get(
            sop_instance_uid=response.json()["sop_instance_uid"]
        )
        stored = Stored(
            data=data if stored_as is None else stored_as,
            study=instance.series.study.study_instance_uid,
            series=instance.series.series_instance_uid,
            sop=instance.sop_instance_uid,
        )
        return Visit(clinicians["partner"], client, keys["partner"], stored).run()

    return publish_and_open


# pydicom's samples that are odd on purpose (its test_files/README.txt) and that ingest stores.
ODD_SAMPLES = [
    "badVR.dcm",  # an IS Number of Frames of "1A"
    "JPEG2000-embedded-sequence-delimiter.dcm",  # codestream bytes overwritten with a delimiter
    "J2K_pixelrep_mismatch.dcm",  # Pixel Representation that the codestream contradicts
    "JPEG-lossy.dcm",  # a JPEG with invalid SOS parameters
    "MR_small_padded.dcm",  # trailing padding after the pixel data
    "SC_rgb_small_odd.dcm",  # odd rows and columns
    "SC_rgb_small_odd_big_endian.dcm",
    "image_dfl.dcm",  # deflated
    "bad_sequence.dcm",  # pydicom-data: a sequence pydicom reads with warnings
    "explicit_VR-UN.dcm",  # pydicom-data: known elements stored as UN
    "reportsi_with_empty_number_tags.dcm",  # empty IS/DS values, no pixel data
    "waveform_ecg.dcm",  # no image at all
    "rtdose.dcm",  # multi-frame
]


@pytest.mark.parametrize("name", ODD_SAMPLES)
def test_pydicoms_odd_samples_never_answer_a_server_error(odd, name):
    data = sample_path(name).read_bytes()
    if name != "image_dfl.dcm":  # its UIDs are deflated; it has no sibling to collide with
        data = renamed(data, name)
    assert odd(data) == []


def element_named(data: bytes, keyword: str):
    (found,) = [e for e in elements(data) if e.tag == pydicom.datadict.tag_for_keyword(keyword)]
    return found


# The attributes the pages and DICOMweb read from a stored file, and some patient text.
READ_AGAIN = [
    "FileMetaInformationGroupLength",
    "TransferSyntaxUID",
    "SpecificCharacterSet",
    "PatientName",
    "StudyDescription",
    "InstanceNumber",
    "SliceLocation",
    "PixelSpacing",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
]


@pytest.mark.parametrize("vr", [b"ZZ", b"PN", b"AT", b"FD"])
def test_wrong_and_unknown_vrs_on_what_the_pages_read(odd, vr):
    """The VR mutations test_malformed.py stores, on the elements the readers use."""
    base = sample("CT_small.dcm")
    opened = 0
    for number, keyword in enumerate(READ_AGAIN):
        data = with_vr(renamed(base, (vr, number)), element_named(base, keyword), vr)
        problems = odd(data, or_refused=True)
        assert not problems, keyword
        opened += problems is not None
    assert opened


@pytest.mark.parametrize("keyword", ["Rows", "BitsAllocated", "PhotometricInterpretation", "NumberOfFrames"])
def test_an_unknown_vr_in_an_encapsulated_image(odd, keyword):
    base = sample("JPEG2000.dcm")
    if keyword == "NumberOfFrames":
        base = dicom_bytes("US", sample="JPEG2000.dcm", NumberOfFrames=1)
    data = with_vr(renamed(base, keyword), element_named(base, keyword), b"ZZ")
    assert odd(data) == []


def test_odd_element_lengths_that_ingest_stores(odd):
    base = sample("CT_small.dcm")
    opened = 0
    for number, element in enumerate(elements(base)):
        for length in {element.length + 1, max(element.length - 1, 0) | 1}:
            data = with_length(renamed(base, (number, length)), element, length)
            problems = odd(data, or_refused=True)
            assert not problems, (f"{element.tag:08X}", length)
            opened += problems is not None
    assert opened


def test_bit_flips_in_the_header_that_ingest_stores(odd):
    base = sample("CT_small.dcm")
    end = header_end(base)
    flips = random.Random("odd files")
    opened = 0
    while opened < 25:
        mutated = bytearray(renamed(base, opened))
        for _ in range(flips.choice((1, 2))):
            mutated[flips.randrange(132, end)] ^= 1 << flips.randrange(8)
        problems = odd(bytes(mutated), or_refused=True)
        assert not problems
        opened += problems is not None


def corrupted_pixels(name: str, seed: str) -> bytes:
    """The sample with bytes of its (compressed) pixel data overwritten; the framing stays intact."""
    data = bytearray(renamed(sample_path(name).read_bytes(), seed))
    pixels = elements(bytes(data))[-1]
    assert pixels.tag == PIXEL_DATA
    # Inside the first fragment only, past the basic offset table item and the fragment's item header.
    (table,) = struct.unpack_from("<L", data, pixels.value + 4)
    start = pixels.value + 8 + table + 8
    (fragment,) = struct.unpack_from("<L", data, start - 4)
    chooser = random.Random(seed)
    for _ in range(64):
        data[chooser.randrange(start + fragment // 4, start + fragment)] = chooser.randrange(256)
    return bytes(data)


def with_text(name: str, keyword: str, text: bytes) -> bytes:
    """The sample with one text value overwritten in place (padded to its length), past what pydicom would write."""
    data = renamed(sample_path(name).read_bytes(), keyword)
    element = element_named(data, keyword)
    assert len(text) <= element.length
    return data[: element.value] + text.ljust(element.length) + data[element.value + element.length :]


def with_value(name: str, **attributes) -> bytes:
    return dicom_bytes("CT", sample=name, **attributes)


CASES = {
    "a file meta group length that lies": lambda: (
        lambda d: d[: elements(d)[0].value] + struct.pack("<L", 12) + d[elements(d)[0].value + 4 :]
    )(dicom_bytes("CT")),
    "implicit data under an explicit syntax": lambda: mixed(pydicom.uid.ExplicitVRLittleEndian, implicit=True),
    "explicit data under the implicit syntax": lambda: mixed(pydicom.uid.ImplicitVRLittleEndian, implicit=False),
    "text after the pixel data": lambda: dicom_bytes("CT") + b"garbage after the image" * 100,
    "another file after the pixel data": lambda: dicom_bytes("US", sample="JPEG2000.dcm") + sample("MR_small.dcm"),
    "trailing padding": lambda: dicom_bytes("CT") + explicit_element(0xFFFCFFFC, b"OB", bytes(256)),
    "sequences nested as deep as ingest allows": lambda: inserted_before_pixels(
        dicom_bytes("CT"), nested(64, undefined=True)
    ),
    "numbers past 32 bits": lambda: dicom_bytes("CT", InstanceNumber="999999999999", SeriesNumber="-99999999999"),
    "NUL-filled text": lambda: dicom_bytes("CT", PatientName="Doe\x00^Jane" + "x" * 400, StudyDescription="\x00" * 300),
    "more frames than the fragments hold": lambda: dicom_bytes("US", sample="JPEG2000.dcm", NumberOfFrames="4"),
    "zero rows": lambda: with_value("CT_small.dcm", Rows=0),
    "twelve bits allocated": lambda: with_value("CT_small.dcm", BitsAllocated=12),
    "an unknown photometric interpretation": lambda: with_value("CT_small.dcm", PhotometricInterpretation="BOGUS"),
    "a rescale slope that is not a number": lambda: with_text("CT_small.dcm", "RescaleSlope", b"x"),
    "a rescale intercept that is not a number": lambda: with_text("CT_small.dcm", "RescaleIntercept", b"-x"),
    "a study date that is no date": lambda: with_text("CT_small.dcm", "StudyDate", b"2026-13-"),
    "a window of width zero": lambda: with_value("CT_small.dcm", WindowCenter="40", WindowWidth="0"),
    "three rescale intercepts": lambda: with_value("CT_small.dcm", RescaleIntercept=["1", "2", "3"]),
    "a corrupt JPEG 2000 codestream": lambda: corrupted_pixels("JPEG2000.dcm", "j2k"),
    "corrupt RLE segments": lambda: corrupted_pixels("MR_small_RLE.dcm", "rle"),
    "corrupt JPEG-LS": lambda: corrupted_pixels("MR_small_jpeg_ls_lossless.dcm", "jls"),
}


def mixed(meta_syntax: str, *, implicit: bool) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes("MR", sample="MR_small.dcm")))
    dataset.file_meta.TransferSyntaxUID = meta_syntax
    return part10(dataset.file_meta, encoded(dataset, implicit=implicit))


@pytest.mark.parametrize("case", CASES)
def test_odd_values_and_encodings_never_answer_a_server_error(odd, case):
    assert odd(CASES[case]()) == []


def test_an_executable_preamble_is_served_zeroed_everywhere(odd):
    data = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00" + dicom_bytes("CT")[10:]
    assert odd(data, stored_as=bytes(128) + data[128:]) == []


def test_a_series_with_nothing_to_show_gets_a_placeholder_thumbnail_and_message(odd, clinicians):
    data = renamed(sample_path("waveform_ecg.dcm").read_bytes(), "ecg")
    assert odd(data) == []
    instance = Instance.objects.select_related("series").get()
    browser = clinicians["partner"]
    thumbnail = browser.get(f"/series/{instance.series.series_instance_uid}/thumbnail.jpg")
    assert thumbnail.status_code == 404
    assert thumbnail["Content-Type"] == "image/jpeg"
    assert thumbnail.content.startswith(b"\xff\xd8\xff")
    page = browser.get(f"/series/{instance.series.series_instance_uid}/").content.decode()
    assert "Nothing in this series can be shown as an image." in page
    frame = browser.get(f"/instances/{instance.sop_instance_uid}/frames/0")
    assert (frame.status_code, frame["Content-Type"]) == (404, "image/png")
