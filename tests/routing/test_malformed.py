"""POST /api/v1/instances with the messy files real modalities and broken links make.

Every answer is a stored instance (201/200, kept byte for byte) or a 4xx with
a JSON error that says what is wrong, never a 5xx: an agent retries a 5xx
forever, and a center's outbox waits behind the file. Each mutation starts
from one of pydicom's real sample files.
"""

import hashlib
import io
import itertools
import logging
import random
import struct
import tracemalloc

import pydicom
import pytest

from routing.dicom import MAX_DEPTH
from routing.models import Instance
from tests.dicomfiles import sample_path
from tests.routing.dicombytes import (
    PIXEL_DATA,
    SEQUENCE_DELIMITER,
    deflated_meta,
    deflated_stream,
    elements,
    encoded,
    explicit_element,
    header_end,
    inserted_before_pixels,
    item,
    part10,
    sample,
    with_length,
    with_vr,
    zeros,
)

pytestmark = pytest.mark.django_db

# Explicit and implicit VR, big endian, nested sequences, encapsulated pixel data, multi-frame.
SAMPLES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "rtplan.dcm",
    "JPEG2000.dcm",
    "ExplVR_BigEnd.dcm",
    "emri_small.dcm",
    "MR_small_implicit.dcm",
]
EXPLICIT_SAMPLES = ["CT_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "ExplVR_BigEnd.dcm"]


class Uploads:
    """Sends bodies as the publishing agent and checks every answer against the contract."""

    def __init__(self, agent, storage_dir, caplog) -> None:
        self.agent = agent
        self.storage_dir = storage_dir
        self.caplog = caplog
        self.answers: dict[int, int] = {}

    def send(self, body: bytes):
        # Straight to the endpoint: the fan-out queued on commit is not what
        # these thousands of uploads test (the test transaction never commits).
        response = self.agent.client.post(
            "/api/v1/instances", data=body, content_type="application/dicom", **self.agent.auth
        )
        status = response.status_code
        self.answers[status] = self.answers.get(status, 0) + 1
        assert status in (200, 201) or 400 <= status < 500, response.content[:300]
        assert response["Content-Type"].startswith("application/json")
        if status >= 400:
            assert response.json()["error"]
        else:
            instance = Instance.objects.get(sop_instance_uid=response.json()["sop_instance_uid"])
            assert (self.storage_dir / instance.file).read_bytes() == body
            assert response.json()["sha256"] == hashlib.sha256(body).hexdigest()
            # The next mutation of the same file keeps its SOP Instance UID: let it be stored anew, not a 409.
            instance.delete()
        # Every refusal is one the reader means: none comes from the safety net for its bugs.
        assert not [r for r in self.caplog.records if "header reader failed" in r.getMessage()]
        return response


@pytest.fixture
def uploads(agents, storage_dir, caplog):
    caplog.set_level(logging.ERROR, logger="routing.services")
    return Uploads(agents["own"], storage_dir, caplog)


def test_the_reported_file_is_refused_with_a_reason_not_a_server_error(uploads):
    """CT_small.dcm with the length of (0008,0012) changed to 11 answered 500."""
    data = sample("CT_small.dcm")
    [instance_creation_date] = [e for e in elements(data) if e.tag == 0x00080012]
    response = uploads.send(with_length(data, instance_creation_date, 11))
    assert response.status_code == 400
    assert "truncated" in response.json()["error"]


@pytest.mark.parametrize("name", SAMPLES)
def test_odd_and_oversized_element_lengths(uploads, name):
    data = sample(name)
    for element in elements(data):
        limit = 0xFFFFFFFE if element.length_size == 4 else 0xFFFF
        for length in {element.length + 1, max(element.length - 1, 0) | 1, limit, len(data), 0x7FFFFFFF & limit}:
            uploads.send(with_length(data, element, length))
    assert uploads.answers.get(400)


@pytest.mark.parametrize("name", EXPLICIT_SAMPLES)
def test_wrong_and_unknown_vrs(uploads, name):
    data = sample(name)
    for element in elements(data):
        for vr in (b"ZZ", b"\x00\x00", b"SQ"):
            uploads.send(with_vr(data, element, vr))
    assert uploads.answers.get(201) and uploads.answers.get(400)


@pytest.mark.parametrize("name", ["MR_small_implicit.dcm", "CT_small.dcm", "JPEG2000.dcm"])
def test_undefined_lengths_outside_sequences(uploads, name):
    data = sample(name)
    for element in elements(data):
        if element.length_size == 4 and element.tag != PIXEL_DATA:
            uploads.send(with_length(data, element, 0xFFFFFFFF))
    assert uploads.answers.get(400)


def test_an_undefined_length_that_holds_no_items_is_refused_with_the_element_named(uploads):
    """Only sequences and encapsulated pixel data may have an undefined length (PS3.5 7.1.1)."""
    data = sample("CT_small.dcm")
    private = explicit_element(0x7FD10010, b"LO", b"EXCHANGE") + explicit_element(
        0x7FD11010, b"OB", b"\x01\x02\x03\x04" + SEQUENCE_DELIMITER, length=0xFFFFFFFF
    )
    response = uploads.send(inserted_before_pixels(data, private))
    assert response.status_code == 400
    assert "(7FD1,1010) has an undefined length" in response.json()["error"]


def nested(depth: int, *, undefined: bool) -> bytes:
    """A private sequence nested `depth` deep, each level one item holding the next sequence."""
    inner = explicit_element(0x7FD11001, b"LO", b"DEEP")
    for _ in range(depth):
        if undefined:
            inner = explicit_element(0x7FD11010, b"SQ", item(inner, undefined=True), length=0xFFFFFFFF)
            inner += SEQUENCE_DELIMITER
        else:
            inner = explicit_element(0x7FD11010, b"SQ", item(inner))
    return explicit_element(0x7FD10010, b"LO", b"EXCHANGE") + inner


@pytest.mark.parametrize("undefined", [True, False], ids=["undefined lengths", "defined lengths"])
def test_sequences_nested_thousands_deep_are_refused_with_a_reason(uploads, undefined):
    """A receiver's reader recurses into every level: pydicom gives up a few hundred deep."""
    response = uploads.send(inserted_before_pixels(sample("CT_small.dcm"), nested(5000, undefined=undefined)))
    assert response.status_code == 400
    assert f"nested more than {MAX_DEPTH // 2} deep" in response.json()["error"]


@pytest.mark.parametrize("undefined", [True, False], ids=["undefined lengths", "defined lengths"])
def test_sequences_nested_as_deep_as_the_limit_are_stored(uploads, undefined):
    body = inserted_before_pixels(sample("CT_small.dcm"), nested(MAX_DEPTH // 2, undefined=undefined))
    assert uploads.send(body).status_code == 201
    assert len(list(pydicom.dcmread(io.BytesIO(body)).iterall())) > MAX_DEPTH  # a recursive reader reads it all


def test_an_item_longer_than_its_sequence_is_refused(uploads):
    inner = item(explicit_element(0x7FD11001, b"LO", b"ITEM"))
    sequence = explicit_element(0x7FD11010, b"SQ", inner, length=len(inner) - 4) + b"\x00" * 4
    body = inserted_before_pixels(sample("CT_small.dcm"), explicit_element(0x7FD10010, b"LO", b"EXCHANGE") + sequence)
    response = uploads.send(body)
    assert response.status_code == 400
    assert "(7FD1,1010) runs past the end of its sequence" in response.json()["error"]


@pytest.mark.parametrize(
    "body, complaint",
    [
        # The item's delimiter is missing: the sequence delimiter comes right after its elements.
        (
            explicit_element(0x7FD11010, b"SQ", b"", length=0xFFFFFFFF)
            + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
            + explicit_element(0x7FD11001, b"LO", b"ITEM")
            + SEQUENCE_DELIMITER,
            "has no item delimiter",
        ),
        # The sequence's delimiter is missing: the dataset goes on after the last item.
        (
            explicit_element(0x7FD11010, b"SQ", item(explicit_element(0x7FD11001, b"LO", b"ITEM")), length=0xFFFFFFFF),
            "where an item or its delimiter belongs",
        ),
        # An item delimiter where no item is open.
        (struct.pack("<HHL", 0xFFFE, 0xE00D, 0), "outside any sequence"),
    ],
    ids=["no item delimiter", "no sequence delimiter", "a stray item delimiter"],
)
def test_items_whose_delimiters_are_missing(uploads, body, complaint):
    data = sample("CT_small.dcm")
    response = uploads.send(inserted_before_pixels(data, explicit_element(0x7FD10010, b"LO", b"EXCHANGE") + body))
    assert response.status_code == 400
    assert complaint in response.json()["error"]


def boundaries(data: bytes) -> list[int]:
    """Every top-level element boundary, and every item and delimiter tag inside sequences."""
    cuts = set()
    for element in elements(data):
        cuts.update({element.start, element.value})
        if element.length != 0xFFFFFFFF:
            cuts.add(element.value + element.length)
    for tag in (b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0", b"\xff\xfe\xe0\x00"):
        at = data.find(tag, 132)
        while at != -1:
            cuts.update({at, at + 8})
            at = data.find(tag, at + 1)
    return sorted(cut for cut in cuts if 0 < cut < len(data))


@pytest.mark.parametrize("name", SAMPLES)
def test_truncation_at_every_element_boundary_of_the_header(uploads, name):
    data = sample(name)
    for cut in boundaries(data):
        uploads.send(data[:cut])
    assert uploads.answers.get(400)


@pytest.mark.parametrize("name", SAMPLES + ["image_dfl.dcm"])
def test_bit_flips_in_the_header(uploads, name):
    data = sample(name)
    end = len(data) if name == "image_dfl.dcm" else header_end(data)
    flips = random.Random(name)
    for _ in range(150):
        mutated = bytearray(data)
        for _ in range(flips.choice((1, 1, 2, 3))):
            mutated[flips.randrange(128, end)] ^= 1 << flips.randrange(8)
        uploads.send(bytes(mutated))
    assert uploads.answers.get(400)


@pytest.mark.parametrize("value", [0, 1, 12, 10**6, 0xFFFFFFFF])
def test_a_file_meta_group_length_that_lies_is_stored_as_sent(uploads, value):
    data = sample("CT_small.dcm")
    group_length = elements(data)[0]
    assert group_length.tag == 0x00020000
    lying = data[: group_length.value] + struct.pack("<L", value) + data[group_length.value + 4 :]
    assert uploads.send(lying).status_code == 201


@pytest.mark.parametrize(
    "meta_syntax, implicit",
    [
        (pydicom.uid.ExplicitVRLittleEndian, True),
        (pydicom.uid.ImplicitVRLittleEndian, False),
    ],
    ids=["implicit data under an explicit syntax", "explicit data under the implicit syntax"],
)
def test_data_in_the_other_vr_style_than_its_transfer_syntax_is_read_and_stored(uploads, meta_syntax, implicit):
    dataset = pydicom.dcmread(sample_path("MR_small.dcm"))
    meta = dataset.file_meta
    meta.TransferSyntaxUID = meta_syntax
    response = uploads.send(part10(meta, encoded(dataset, implicit=implicit)))
    assert response.status_code == 201
    assert response.json()["sop_instance_uid"] == dataset.SOPInstanceUID


@pytest.mark.parametrize(
    "trailer",
    [
        b"\x00",
        b"garbage after the image" * 100,
        explicit_element(0xFFFCFFFC, b"OB", bytes(256)),  # Data Set Trailing Padding
        None,  # a whole second file
    ],
    ids=["one byte", "text", "trailing padding", "another file"],
)
@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG2000.dcm", "MR_small_implicit.dcm"])
def test_bytes_after_the_pixel_data_are_stored_as_sent(uploads, name, trailer):
    data = sample(name)
    response = uploads.send(data + (sample("MR_small.dcm") if trailer is None else trailer))
    assert response.status_code == 201


def deflated_ct(*, before_pixels: list[bytes], pixels: list[bytes], pixel_length: int, **attributes) -> bytes:
    """CT_small in the deflated transfer syntax, with extra element bytes before its Pixel Data.

    The parts are compressed as they come, so a bomb is never whole in memory.
    """
    dataset = pydicom.dcmread(sample_path("CT_small.dcm"))
    del dataset.PixelData
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    pixel_header = struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\x00\x00" + struct.pack("<L", pixel_length)
    body = deflated_stream(itertools.chain([encoded(dataset, implicit=False)], before_pixels, [pixel_header], pixels))
    return part10(deflated_meta(dataset), body)


def bomb_element(size: int) -> list[bytes]:
    """A private OB element of `size` zero bytes, as chunks."""
    head = explicit_element(0x7FD10010, b"LO", b"EXCHANGE") + explicit_element(0x7FD11010, b"OB", b"", length=size)
    return [head, *zeros(size)]


def test_a_deflated_file_with_an_ordinary_private_element_is_stored(uploads):
    ct_pixels = pydicom.dcmread(sample_path("CT_small.dcm")).PixelData
    body = deflated_ct(before_pixels=bomb_element(4096), pixels=[ct_pixels], pixel_length=len(ct_pixels))
    assert uploads.send(body).status_code == 201


def test_a_512_mb_deflate_bomb_in_the_header_is_refused_in_bounded_memory(uploads):
    """Under the default 2 GB upload limit: a few hundred kilobytes that inflate to 512 MB of one header element."""
    size = 512 * 1024 * 1024
    ct_pixels = pydicom.dcmread(sample_path("CT_small.dcm")).PixelData
    body = deflated_ct(before_pixels=bomb_element(size), pixels=[ct_pixels], pixel_length=len(ct_pixels))
    assert len(body) < size // 500
    tracemalloc.start()
    try:
        response = uploads.send(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status_code == 413
    assert "inflates past" in response.json()["error"]
    assert peak < 64 * 1024 * 1024


def test_a_deflate_bomb_in_the_pixel_data_is_refused(uploads):
    size = 4096 * 4096 * 2 * 4  # the 4 frames of 16-bit pixels the header describes, all zero
    body = deflated_ct(
        before_pixels=[], pixels=zeros(size), pixel_length=size, Rows=4096, Columns=4096, NumberOfFrames=4
    )
    response = uploads.send(body)
    assert response.status_code == 413
    assert "inflates past" in response.json()["error"]


def test_a_deflate_bomb_past_a_low_upload_limit_is_refused(uploads, settings):
    settings.DICOM_MAX_UPLOAD_BYTES = 1024 * 1024
    ct_pixels = pydicom.dcmread(sample_path("CT_small.dcm")).PixelData
    body = deflated_ct(before_pixels=bomb_element(8 * 1024 * 1024), pixels=[ct_pixels], pixel_length=len(ct_pixels))
    assert uploads.send(body).status_code == 413


@pytest.mark.parametrize(
    "attributes",
    [
        {"InstanceNumber": "999999999999", "SeriesNumber": "-99999999999"},
        {"PatientName": "Doe\x00^Jane" + "x" * 400, "StudyDescription": "\x00" * 300, "PatientBirthDate": "00000000"},
        {"StudyDate": "20261399", "StudyTime": "25" * 20, "PatientSex": "unknown-and-too-long"},
    ],
    ids=["numbers past 32 bits", "long and NUL-filled text", "impossible dates and times"],
)
def test_values_past_what_the_index_holds_are_stored_with_the_file_intact(uploads, attributes):
    """Only the five required attributes decide; the index keeps what it can of the others."""
    from tests.dicomfiles import dicom_bytes

    assert uploads.send(dicom_bytes("CT", **attributes)).status_code == 201
