import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from agent.send import Outcome, Result, discover_files, is_dicom_file, summarize


@pytest.fixture
def ct_small():
    path = get_testdata_file("CT_small.dcm", download=False)
    if path is None:
        pytest.skip("pydicom's CT_small.dcm is not installed")
    return Path(path)


def test_it_recognises_a_real_dicom_file(ct_small):
    assert is_dicom_file(ct_small)


def test_it_rejects_a_text_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n" * 20)
    assert not is_dicom_file(notes)


def test_it_rejects_a_file_shorter_than_the_preamble(tmp_path):
    stub = tmp_path / "stub.dcm"
    stub.write_bytes(b"DICM")
    assert not is_dicom_file(stub)


def test_it_rejects_dicm_at_the_wrong_offset(tmp_path):
    shifted = tmp_path / "shifted.dcm"
    shifted.write_bytes(b"\0" * 127 + b"DICM" + b"\0" * 100)
    assert not is_dicom_file(shifted)


def test_it_finds_files_recursively_in_sorted_order(tmp_path, ct_small):
    for name in ("b/2.dcm", "b/1.dcm", "a/deep/x.dcm", "z.dcm", "a/y.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ct_small, tmp_path / name)
    found = [p.relative_to(tmp_path).as_posix() for p in discover_files([tmp_path])]
    assert found == ["z.dcm", "a/y.txt", "a/deep/x.dcm", "b/1.dcm", "b/2.dcm"]
    assert discover_files([tmp_path]) == discover_files([tmp_path])


def test_it_leaves_out_hidden_entries_inside_folders(tmp_path):
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.dcm").write_bytes(b"x")
    (tmp_path / ".sop.dcm.1234.part").write_bytes(b"x")
    (tmp_path / "keep.dcm").write_bytes(b"x")
    assert discover_files([tmp_path]) == [tmp_path / "keep.dcm"]


def test_it_lists_each_file_once_and_keeps_argument_order(tmp_path):
    (tmp_path / "d").mkdir()
    first, second = tmp_path / "d" / "1.dcm", tmp_path / "2.dcm"
    first.write_bytes(b"x")
    second.write_bytes(b"x")
    assert discover_files([second, tmp_path / "d", first]) == [second, first]


def test_it_keeps_a_missing_path_so_it_is_reported(tmp_path):
    missing = tmp_path / "gone.dcm"
    assert discover_files([missing]) == [missing]


def test_it_summarises_counts_and_names_each_failure():
    outcomes = [
        Outcome(Path("a.dcm"), Result.SENT),
        Outcome(Path("b.dcm"), Result.ALREADY_PRESENT),
        Outcome(Path("c.txt"), Result.SKIPPED, "not a DICOM file"),
        Outcome(Path("d.dcm"), Result.FAILED, "HTTP 409: SOPInstanceUID exists with different bytes"),
    ]
    assert summarize(outcomes).splitlines() == [
        "1 sent, 1 already present, 1 skipped, 1 failed",
        "failed: d.dcm: HTTP 409: SOPInstanceUID exists with different bytes",
    ]
