"""De-identification of one instance for one recipient (subscription option `deidentify: basic`).

DICOM PS3.15 Annex E, the Basic Application Level Confidentiality Profile, made of
two maintained libraries rather than a tag list of our own:

- dicognito replaces every identifying value that must stay consistent: each UID
  (but class and transfer syntax UIDs), person names, IDs (Patient ID, Accession
  Number, Study ID...), addresses and equipment, and shifts every date and time
  by one offset. Seeded per publisher and recipient, the same original always gets
  the same replacement for that recipient, so a study that arrives over days stays
  one study and one patient keeps one pseudonymous Patient ID.
- dicom-anonymizer carries Annex E's table (its 2026c edition): what dicognito
  left of an attribute the profile removes (X) is removed, what it must empty (Z)
  or replace (D) and dicognito did not replace is emptied. Private attributes go.

Pixel Data is never decoded nor rewritten: its bytes stay identical. An instance
whose Burned In Annotation is YES carries identity in its pixels, and is held.
"""

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from dicognito.anonymizer import Anonymizer
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as annex_e
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

METHOD = ["PS3.15 Basic Application Confidentiality Profile", "dicognito 0.19.0; Annex E table 2026c"]
# PS3.16 CID 7050. Dates are shifted by a secret offset per recipient, not emptied:
# that is the profile's Retain Longitudinal Temporal Information with Modified Dates Option.
METHOD_CODES = [
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
]


class Held(Exception):
    """The instance must not reach a de-identifying recipient at all; the message says why."""


@dataclass(frozen=True)
class Pseudonyms:
    """The original and new value of each identifier the exchange indexes."""

    patient_id: tuple[str, str]
    study_instance_uid: tuple[str, str]
    series_instance_uid: tuple[str, str]
    sop_instance_uid: tuple[str, str]


@dataclass(frozen=True)
class Deidentified:
    dataset: Dataset
    pseudonyms: Pseudonyms


def seed_for(*, secret: str, publisher_id: int, recipient_id: int) -> str:
    """The anonymizer's seed: secret, and distinct per publisher and recipient.

    Per recipient, so two recipients cannot link their copies by UID. Per publisher
    too, because Patient IDs are only unique at their center: two publishers' patient
    "1234" must not become one pseudonymous patient.
    """
    message = f"deidentify:basic:{publisher_id}:{recipient_id}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def deidentify(dataset: Dataset, *, seed: str) -> Deidentified:
    """De-identify `dataset` in place; Held if it must not be sent de-identified."""
    if str(dataset.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise Held("Burned In Annotation is YES: identity may be in the pixels, so it is not sent de-identified.")
    before = (
        str(dataset.get("PatientID", "")),
        str(dataset.get("StudyInstanceUID", "")),
        str(dataset.get("SeriesInstanceUID", "")),
        str(dataset.get("SOPInstanceUID", "")),
    )
    untouched = _snapshot(dataset, _REPLACED)
    Anonymizer(seed=seed).anonymize(dataset)
    dataset.walk(_annex_e_rest(untouched))
    dataset.remove_private_tags()
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = METHOD
    dataset.DeidentificationMethodCodeSequence = [_code(value, meaning) for value, meaning in METHOD_CODES]
    after = (
        str(dataset.get("PatientID", "")),
        str(dataset.get("StudyInstanceUID", "")),
        str(dataset.get("SeriesInstanceUID", "")),
        str(dataset.get("SOPInstanceUID", "")),
    )
    return Deidentified(dataset=dataset, pseudonyms=Pseudonyms(*zip(before, after, strict=True)))


def deidentify_file(source: BinaryIO, target: BinaryIO, *, seed: str) -> Pseudonyms:
    """Write the de-identified Part-10 file of `source` to `target`, in the original's transfer syntax.

    Only the dataset is held in memory, never the file's bytes besides.
    """
    result = deidentify(pydicom.dcmread(source), seed=seed)
    result.dataset.save_as(target, enforce_file_format=True)
    return result.pseudonyms


class _TagSet:
    """Annex E's tags, with its masked groups (curves 50xx, overlays 60xx)."""

    def __init__(self, entries: Iterable[tuple]) -> None:
        self.exact: set[int] = set()
        self.masked: list[tuple[int, int, int, int]] = []
        for entry in entries:
            if len(entry) == 2:
                self.exact.add((entry[0] << 16) | entry[1])
            else:
                self.masked.append(entry)

    def __contains__(self, tag: int) -> bool:
        if tag in self.exact:
            return True
        group, element = tag >> 16, tag & 0xFFFF
        return any(group & gm == g and element & em == e for g, e, gm, em in self.masked)


_REMOVED = _TagSet(annex_e.X_TAGS + annex_e.X_Z_TAGS + annex_e.X_D_TAGS + annex_e.X_Z_D_TAGS)
# X/Z/U*: removed, but a sequence of references stays with its UIDs replaced (by dicognito).
_REMOVED_BUT_REFERENCES = _TagSet(annex_e.X_Z_U_STAR_TAGS)
_REPLACED = _TagSet(annex_e.Z_TAGS + annex_e.D_TAGS + annex_e.Z_D_TAGS)


def _snapshot(dataset: Dataset, tags: _TagSet) -> dict[int, tuple[DataElement, object]]:
    """The elements of these tags as they are now, to tell afterwards which ones dicognito replaced."""
    found: dict[int, tuple[DataElement, object]] = {}

    def keep(_dataset: Dataset, element: DataElement) -> None:
        if element.tag in tags:
            found[id(element)] = (element, _value_copy(element))

    dataset.walk(keep)
    return found


def _value_copy(element: DataElement) -> object:
    return None if element.VR == "SQ" else element.value


def _annex_e_rest(untouched: dict[int, tuple[DataElement, object]]):
    """A `Dataset.walk` callback applying Annex E to what dicognito left as it was."""

    def apply(dataset: Dataset, element: DataElement) -> None:
        tag = element.tag
        if tag in _REMOVED or (tag in _REMOVED_BUT_REFERENCES and element.VR not in ("SQ", "UI")):
            del dataset[tag]
        elif tag in _REPLACED:
            seen = untouched.get(id(element))
            if seen is not None and seen[0] is element and (element.VR == "SQ" or element.value == seen[1]):
                element.value = [] if element.VR == "SQ" else None

    return apply


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item
