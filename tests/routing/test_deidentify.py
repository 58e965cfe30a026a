"""The Basic Application Level Confidentiality Profile as applied to one instance (routing.deidentify)."""

import io

import pydicom
import pytest
from pydicom.uid import generate_uid

from routing.deidentify import Held, Pseudonyms, deidentify_file, seed_for
from tests.dicomfiles import dicom_bytes, sample_path

PARTNER = seed_for(secret="s3cret", publisher_id=1, recipient_id=2)
OUTSIDER = seed_for(secret="s3cret", publisher_id=1, recipient_id=3)
# What a clinician types into a modality and the profile must take away.
IDENTITY = {
    "patient_name": "Rostami^Sara",
    "patient_id": "PAT-777",
    "PatientBirthDate": "19800214",
    "PatientAddress": "12 Zand Street, Shiraz",
    "OtherPatientNames": "Rostami^S",
    "AccessionNumber": "ACC-5521",
    "InstitutionName": "Shiraz Imaging Clinic",
    "ReferringPhysicianName": "Karimi^Ali",
    "StudyDescription": "Head trauma after fall",
    "SeriesDescription": "Axial bone window",
    "ImageComments": "patient confused",
    "StudyDate": "20260301",
}


def deidentify_bytes(data: bytes, *, seed: str) -> tuple[bytes, Pseudonyms]:
    out = io.BytesIO()
    pseudonyms = deidentify_file(io.BytesIO(data), out, seed=seed)
    return out.getvalue(), pseudonyms


def identified(sample: str = "CT_small.dcm", **overrides) -> bytes:
    return dicom_bytes("CT", sample=sample, **{**IDENTITY, **overrides})


def read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def test_it_removes_the_identity_from_every_byte_of_the_file():
    original = identified()
    copy, _ = deidentify_bytes(original, seed=PARTNER)
    source = read(original)
    for value in [
        b"Rostami",
        b"PAT-777",
        b"19800214",
        b"Zand Street",
        b"ACC-5521",
        b"Shiraz Imaging",
        b"Karimi",
        b"Head trauma",
        b"Axial bone",
        b"confused",
        b"20260301",
        source.StudyInstanceUID.encode(),
        source.SeriesInstanceUID.encode(),
        source.SOPInstanceUID.encode(),
    ]:
        assert value not in copy, value


def test_it_marks_the_copy_as_de_identified_by_the_basic_profile():
    ds = read(deidentify_bytes(identified(), seed=PARTNER)[0])
    assert ds.PatientIdentityRemoved == "YES"
    assert "PS3.15 Basic Application Confidentiality Profile" in ds.DeidentificationMethod
    codes = {(item.CodeValue, item.CodingSchemeDesignator) for item in ds.DeidentificationMethodCodeSequence}
    assert ("113100", "DCM") in codes


def test_it_keeps_what_a_reader_needs_and_the_profile_allows():
    ds = read(deidentify_bytes(identified(), seed=PARTNER)[0])
    assert ds.Modality == "CT"
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.PatientID and ds.PatientID != "PAT-777"
    assert ds.StudyDate and ds.StudyDate != "20260301", "dates are shifted, not emptied"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_the_same_original_gets_the_same_pseudonyms_for_one_recipient():
    study_uid, series_uid = generate_uid(), generate_uid()
    first = identified(study_uid=study_uid, series_uid=series_uid, instance_number=1)
    second = identified(study_uid=study_uid, series_uid=series_uid, instance_number=2)
    _, one = deidentify_bytes(first, seed=PARTNER)
    _, two = deidentify_bytes(second, seed=PARTNER)
    _, again = deidentify_bytes(first, seed=PARTNER)
    assert one == again
    assert one.study_instance_uid == two.study_instance_uid
    assert one.series_instance_uid == two.series_instance_uid
    assert one.patient_id == two.patient_id == ("PAT-777", one.patient_id[1])
    assert one.sop_instance_uid != two.sop_instance_uid


def test_two_recipients_cannot_link_their_copies():
    original = identified()
    _, partner = deidentify_bytes(original, seed=PARTNER)
    _, outsider = deidentify_bytes(original, seed=OUTSIDER)
    for kind in ("patient_id", "study_instance_uid", "series_instance_uid", "sop_instance_uid"):
        assert getattr(partner, kind)[0] == getattr(outsider, kind)[0]
        assert getattr(partner, kind)[1] != getattr(outsider, kind)[1], kind


def test_one_patient_id_at_two_publishers_is_two_pseudonymous_patients():
    other_publisher = seed_for(secret="s3cret", publisher_id=9, recipient_id=2)
    _, ours = deidentify_bytes(identified(), seed=PARTNER)
    _, theirs = deidentify_bytes(identified(), seed=other_publisher)
    assert ours.patient_id[1] != theirs.patient_id[1]


@pytest.mark.parametrize(
    "sample",
    [
        "CT_small.dcm",  # explicit VR little endian
        "MR_small_implicit.dcm",  # implicit VR
        "JPEG2000.dcm",  # encapsulated JPEG 2000
        "SC_rgb_rle.dcm",  # encapsulated RLE
        "emri_small_jpeg_2k_lossless.dcm",  # multi-frame, encapsulated
    ],
)
def test_the_pixel_data_stays_byte_identical(sample):
    original = identified(sample)
    copy = read(deidentify_bytes(original, seed=PARTNER)[0])
    source = read(original)
    assert copy.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert copy.PixelData == source.PixelData


def test_it_removes_private_attributes():
    ds = pydicom.dcmread(sample_path("CT_small.dcm"))
    block = ds.private_block(0x0029, "ACME SECRET 1.0", create=True)
    block.add_new(0x10, "LO", "Rostami Sara private copy")
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    copy, _ = deidentify_bytes(out.getvalue(), seed=PARTNER)
    assert b"ACME SECRET" not in copy and b"Rostami" not in copy
    assert not [element for element in read(copy) if element.tag.is_private]


def test_it_removes_overlays_and_curves_as_the_profile_says():
    ds = pydicom.dcmread(sample_path("CT_small.dcm"))
    ds.add_new(0x60003000, "OW", b"\xaa\x55" * 64)  # Overlay Data
    ds.add_new(0x60004000, "LT", "drawn by Dr Karimi")  # Overlay Comments
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    copy = read(deidentify_bytes(out.getvalue(), seed=PARTNER)[0])
    assert 0x60003000 not in copy and 0x60004000 not in copy


def test_an_instance_with_burned_in_annotation_is_held():
    with pytest.raises(Held, match="Burned In Annotation"):
        deidentify_bytes(identified(BurnedInAnnotation="YES"), seed=PARTNER)


def test_an_instance_without_burned_in_annotation_is_copied():
    ds = read(deidentify_bytes(identified(BurnedInAnnotation="NO"), seed=PARTNER)[0])
    assert ds.PatientIdentityRemoved == "YES"
