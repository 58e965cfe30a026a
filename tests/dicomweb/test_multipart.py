import io
import random

import pytest

from dicomweb import multipart
from dicomweb.multipart import END_OF_PART, MalformedMultipart, MultipartParser, MultipartReader, multipart_stream
from routing.models import Instance
from tests.dicomfiles import dicom_bytes
from tests.dicomweb.conftest import stow_body


class Trickle(io.BytesIO):
    """A stream that hands out a few bytes at a time, as a slow client's body arrives."""

    def __init__(self, data: bytes, seed: int) -> None:
        super().__init__(data)
        self.rng = random.Random(seed)

    def read(self, size=-1):
        return super().read(min(size if size >= 0 else 1 << 30, self.rng.randint(1, 40)))


def read_all(body: bytes, boundary: str = "b0und", seed: int = 0) -> list[tuple[dict, bytes]]:
    return [(part.headers, part.read()) for part in MultipartReader(Trickle(body, seed), boundary)]


@pytest.mark.parametrize("seed", range(25))
def test_it_splits_parts_whatever_the_chunking(seed, monkeypatch):
    rng = random.Random(seed)
    monkeypatch.setattr(multipart, "_READ", rng.randint(1, 64))
    # Content that nearly holds the delimiter must pass through untouched.
    contents = [
        rng.randbytes(rng.randint(0, 500)) + b"\r\n--b0unD" + rng.randbytes(3) for _ in range(rng.randint(1, 4))
    ]
    body = b"".join(multipart_stream([({"Content-Type": "application/dicom"}, [c]) for c in contents], "b0und"))
    parts = read_all(body, seed=seed)
    assert [content for _, content in parts] == contents
    assert {headers["content-type"] for headers, _ in parts} == {"application/dicom"}


def test_it_skips_a_preamble_and_accepts_padding_and_a_part_without_headers():
    body = (
        b"preamble\r\n--b0und  \r\n\r\nfirst\r\n--b0und\r\nContent-Type: application/dicom\r\n\r\nsecond\r\n--b0und--"
    )
    assert read_all(body) == [({}, b"first"), ({"content-type": "application/dicom"}, b"second")]


@pytest.mark.parametrize(
    "body",
    [
        b"--b0und\r\nContent-Type: application/dicom\r\n\r\nno closing boundary",
        b"--b0und\r\nContent-Type: application/dicom\r\n\r\ncut at the boundary\r\n--b0und",
        b"--b0und\r\nContent-Type: application/dicom",
        b"no boundary anywhere",
        b"--b0und\r\nnot a header line\r\n\r\nx\r\n--b0und--",
    ],
)
def test_it_refuses_a_body_that_is_not_a_whole_message(body):
    with pytest.raises(MalformedMultipart):
        read_all(body)


# Orthanc's DICOMweb client doubles a UUID into its boundary: 73 characters, past RFC 2046's 70.
ORTHANC_BOUNDARY = "0f8e5b2a-3c1d-4e7f-9a6b-5d4c3b2a1f0e-0f8e5b2a-3c1d-4e7f-9a6b-5d4c3b2a1f0e"


@pytest.mark.parametrize("boundary", [ORTHANC_BOUNDARY, "b" * 200])
def test_it_reads_a_boundary_longer_than_the_rfc_allows(boundary):
    assert len(boundary) > 70
    # Written as Orthanc writes it: a Content-Length per part and no CRLF after the close delimiter.
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: 5\r\n\r\nfirst\r\n"
        f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: 6\r\n\r\nsecond\r\n--{boundary}--"
    ).encode()
    assert [content for _, content in read_all(body, boundary)] == [b"first", b"second"]


def parse_pushed(body: bytes, boundary: str, seed: int) -> list:
    """Feed the body to MultipartParser in random pieces, as a server hands it over; the events, joined."""
    rng = random.Random(seed)
    parser = MultipartParser(boundary)
    events = []
    while body:
        size = rng.choice([1, 3, len(boundary), len(boundary) + 4, 100, 5000])
        events += parser.feed(body[:size])
        body = body[size:]
    events += parser.close()
    joined = []
    for event in events:
        if isinstance(event, bytes | memoryview) and joined and isinstance(joined[-1], bytes):
            joined[-1] += bytes(event)
        else:
            joined.append(bytes(event) if isinstance(event, memoryview) else event)
    return joined


@pytest.mark.parametrize("seed", range(40))
def test_the_pushed_parser_splits_parts_whatever_the_pieces(seed):
    rng = random.Random(seed)
    # Content that nearly holds the delimiter, or ends in its first bytes, must pass through untouched.
    contents = [
        rng.randbytes(rng.randint(0, 9000)) + rng.choice([b"\r\n--b0unD", b"\r\n--b0un", b"\r\n", b""])
        for _ in range(rng.randint(1, 4))
    ]
    body = b"".join(multipart_stream([({"Content-Type": "application/dicom"}, [c]) for c in contents], "b0und"))
    events = parse_pushed(b"preamble\r\n" + body, "b0und", seed)
    expected = []
    for content in contents:
        expected += [{"content-type": "application/dicom"}] + ([content] if content else []) + [END_OF_PART]
    assert events == expected


def test_the_pushed_parser_gives_every_whole_part_before_the_error():
    body = b"--b0und\r\n\r\nfirst\r\n--b0und\r\nnot a header line\r\n\r\nx\r\n--b0und--"
    events = parse_pushed(body, "b0und", seed=1)
    assert events[:3] == [{}, b"first", END_OF_PART]
    assert isinstance(events[3], MalformedMultipart) and len(events) == 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"--b0und\r\n\r\ncut", "closing boundary never came"),
        (b"--b0und", "inside a boundary line"),
        (b"--b0und\r\nContent-Type: application/dicom", "inside a part's headers"),
        (b"nothing", "boundary never appears"),
    ],
)
def test_the_pushed_parser_says_where_a_cut_body_ended(body, message):
    error = parse_pushed(body, "b0und", seed=0)[-1]
    assert isinstance(error, MalformedMultipart) and message in str(error)


@pytest.mark.parametrize("boundary", ["b" * 201, "trailing space ", "", "semi;colon", "bad\r\nboundary\n"])
def test_it_refuses_an_invalid_boundary(boundary):
    with pytest.raises(MalformedMultipart):
        MultipartReader(io.BytesIO(b""), boundary)


def test_the_stow_service_accepts_orthancs_boundary(web, network):
    study = "1.2.826.0.1.3680043.8.498.7373"
    content_type = f'multipart/related; type="application/dicom"; boundary={ORTHANC_BOUNDARY}'
    response = web["own"].stow(
        body=stow_body(dicom_bytes("CT", study_uid=study), boundary=ORTHANC_BOUNDARY), content_type=content_type
    )
    assert response.status_code == 200, response.content
    assert Instance.objects.filter(series__study__study_instance_uid=study).count() == 1
