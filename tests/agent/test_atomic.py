import hashlib

import pytest

from agent.atomic import ChecksumMismatch, sha256_of, write_verified

DATA = [b"DICM" * 1000, b"more bytes", b"", b"tail"]
DIGEST = hashlib.sha256(b"".join(DATA)).hexdigest()


def leftovers(folder):
    return [p.name for p in folder.rglob(".*")]


def test_it_places_the_file_when_the_hash_matches(tmp_path):
    dest = tmp_path / "P" / "study" / "series" / "sop.dcm"
    assert write_verified(dest, DATA, DIGEST) == DIGEST
    assert dest.read_bytes() == b"".join(DATA)
    assert sha256_of(dest) == DIGEST
    assert leftovers(tmp_path) == []


def test_it_accepts_an_upper_case_expected_hash(tmp_path):
    dest = tmp_path / "sop.dcm"
    write_verified(dest, DATA, DIGEST.upper())
    assert dest.exists()


def test_it_leaves_no_part_file_and_no_destination_when_the_hash_differs(tmp_path):
    dest = tmp_path / "series" / "sop.dcm"
    with pytest.raises(ChecksumMismatch) as caught:
        write_verified(dest, DATA, "0" * 64)
    assert caught.value.actual == DIGEST
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_it_keeps_the_existing_file_when_the_new_bytes_are_wrong(tmp_path):
    dest = tmp_path / "sop.dcm"
    dest.write_bytes(b"old and good")
    with pytest.raises(ChecksumMismatch):
        write_verified(dest, DATA, "0" * 64)
    assert dest.read_bytes() == b"old and good"


def test_it_cleans_up_when_the_download_breaks_off(tmp_path):
    def broken():
        yield b"first chunk"
        raise ConnectionError("peer went away")

    dest = tmp_path / "sop.dcm"
    with pytest.raises(ConnectionError):
        write_verified(dest, broken(), DIGEST)
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_it_writes_through_a_hidden_part_file_in_the_destination_folder(tmp_path):
    dest = tmp_path / "sop.dcm"
    seen = []

    def chunks():
        seen.extend(p.name for p in tmp_path.iterdir())
        yield b"x"

    write_verified(dest, chunks(), hashlib.sha256(b"x").hexdigest())
    assert len(seen) == 1
    assert seen[0].startswith(".") and seen[0].endswith(".part")
