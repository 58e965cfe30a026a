"""Downloads: one instance, a series or a study as a ZIP streamed straight from storage."""

import re
from collections.abc import Iterable, Iterator

from zipstream import ZIP_STORED, ZipStream

from routing.models import Instance
from routing.services import instance_open

CHUNK = 256 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_part(value: object, fallback: str) -> str:
    """A DICOM value as one path component: no separators, no dot-names, bounded length."""
    text = _UNSAFE.sub("_", str(value or "").replace("^", " ").strip()).strip("._")
    return text[:64] or fallback


def instance_chunks(instance: Instance) -> Iterator[bytes]:
    """The stored bytes in chunks; storage is opened at the first chunk, not before."""
    with instance_open(instance) as fp:
        while chunk := fp.read(CHUNK):
            yield chunk


def instance_filename(instance: Instance) -> str:
    number = f"{instance.instance_number:05d}" if instance.instance_number is not None else "x"
    return f"{number}_{safe_part(instance.sop_instance_uid, 'instance')}.dcm"


def series_folder(instance: Instance) -> str:
    series = instance.series
    number = f"{series.series_number:03d}" if series.series_number is not None else "000"
    label = safe_part(series.description, "")
    return "_".join(filter(None, [number, safe_part(series.modality, "OT"), label]))


def study_folder(study) -> str:
    patient = study.patient
    who = "_".join(filter(None, [safe_part(patient.patient_id, ""), safe_part(patient.name, "")])) or "patient"
    when = study.study_date.strftime("%Y%m%d") if study.study_date else "nodate"
    return f"{who}/{when}_{safe_part(study.description, 'study')}"


def zip_stream(*, instances: Iterable[Instance], root: str) -> ZipStream:
    """A ZIP of plain folders (root/series/instance.dcm, no DICOMDIR), never built in memory.

    Sizes are known from the index, so the archive's length is known before the
    first byte is sent and browsers show real progress.
    """
    archive = ZipStream(compress_type=ZIP_STORED, sized=True)
    for instance in instances:
        archive.add(
            # A generator: the file is opened only when the archive reaches it.
            instance_chunks(instance),
            f"{root}/{series_folder(instance)}/{instance_filename(instance)}",
            size=instance.size,
        )
    return archive
