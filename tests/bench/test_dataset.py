"""The benchmark's data set: the paper's shape, valid Part-10, the same bytes for the same seed."""

import pydicom

from bench.dataset import big_instance, generate
from routing.dicom import read_header


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_images(tmp_path):
    first = generate(tmp_path / "a", seed=7, scale=0.02)
    again = generate(tmp_path / "b", seed=7, scale=0.02)
    other = generate(tmp_path / "c", seed=8, scale=0.02)
    for modality in ("CT", "MR", "NM"):
        assert [p.read_bytes() for p in first[modality]] == [p.read_bytes() for p in again[modality]]
        assert first[modality][0].read_bytes() != other[modality][0].read_bytes()


def test_the_set_has_the_papers_sizes_and_modalities_in_a_few_studies(tmp_path):
    files = generate(tmp_path, seed=1, scale=0.05)
    assert {m: len(ps) for m, ps in files.items()} == {"CT": 36, "MR": 20, "NM": 3}
    expected_kb = {"CT": 513, "MR": 37, "NM": 81}
    for modality, paths in files.items():
        for path in paths:
            assert abs(path.stat().st_size / 1024 - expected_kb[modality]) < 3, path
    studies = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for ps in files.values() for p in ps}
    assert 3 <= len(studies) <= 10


def test_every_file_is_part_10_the_portal_can_index(tmp_path):
    files = generate(tmp_path, seed=3, scale=0.02)
    for modality, paths in files.items():
        for path in paths:
            header = read_header(str(path), max_inflated=10**9)
            assert header.modality == modality
            assert header.patient_id.startswith("IR-")
            ds = pydicom.dcmread(path)
            assert len(ds.PixelData) == ds.Rows * ds.Columns * 2 * int(ds.get("NumberOfFrames", 1))


def test_the_big_multi_frame_instance_has_whole_frames(tmp_path):
    path = big_instance(tmp_path, seed=1, megabytes=5)  # 5 MB of 512 KB frames
    ds = pydicom.dcmread(path)
    assert ds.NumberOfFrames == 10
    assert len(ds.PixelData) == 10 * 512 * 512 * 2
    assert read_header(str(path), max_inflated=10**9).sop_instance_uid == ds.SOPInstanceUID
