"""Writes of de-identification: making the copy of an instance for a `deidentify: basic` recipient.

The fan-out (routing.fanout) leaves a pending DeidentifiedCopy per instance
and such recipient; routing.tasks.deidentify_copy makes it here. The copy is a
file and an Instance of its own (under a Patient, Study and Series that exist only
for that recipient), and the recipient's Delivery is of the copy: the lease, the
file, DICOMweb and the clinician pages show that center nothing but the copy.
"""

import hashlib
import logging
import shutil
import tempfile
import traceback
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.files import File
from django.db import transaction
from django.utils import timezone

from centers.models import Center
from centers.services import audit_record
from routing import notify
from routing.deidentify import Held, Pseudonyms, deidentify_file, seed_for
from routing.dicom import DicomHeader, InvalidDicom, read_header
from routing.models import DeidentifiedCopy, Delivery, Instance, Pseudonym
from routing.services import StoredFileMissing, dicom_storage, instance_open, series_index

logger = logging.getLogger(__name__)

DEIDENTIFY_TASK = "routing.tasks.deidentify_copy"
MISSING_ORIGINAL_REASON = "the original's stored file is missing"
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class _Made:
    """A de-identified file already in storage, waiting for its rows."""

    name: str
    size: int
    sha256: str
    header: DicomHeader
    pseudonyms: Pseudonyms


def deidentified_copy_make(*, copy_id: int) -> str | None:
    """Make a pending copy: its file, its rows and its recipient's delivery, in one transaction.

    Returns the copy's new status, or None when it was not pending (made by another
    run, or gone). Idempotent: the pending row is claimed with a conditional UPDATE
    at commit, and a run that loses the race removes the file it stored.
    """
    row = DeidentifiedCopy.objects.select_related("original__series", "original__source_center", "center").filter(
        pk=copy_id, status=DeidentifiedCopy.Status.PENDING
    )
    copy = row.first()
    if copy is None:
        return None
    original = copy.original
    seed = seed_for(secret=settings.SECRET_KEY, publisher_id=original.source_center_id, recipient_id=copy.center_id)
    with (
        tempfile.TemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR, prefix="original-") as source,
        tempfile.NamedTemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR, prefix="deid-", suffix=".dcm") as spool,
    ):
        # Copied out first, so that a storage error (S3 down) fails the task, to be retried,
        # and only what pydicom makes of the bytes can fail the copy for good.
        try:
            with instance_open(original) as handle:
                shutil.copyfileobj(handle, source, _CHUNK)
        except StoredFileMissing:
            return _settle(copy, DeidentifiedCopy.Status.FAILED, MISSING_ORIGINAL_REASON)
        source.seek(0)
        try:
            pseudonyms = deidentify_file(source, spool, seed=seed)
        except Held as held:
            return _settle(copy, DeidentifiedCopy.Status.HELD, str(held))
        except Exception as exc:
            # The ingest's own reader accepted the file, pydicom's full reader or writer did not:
            # retrying cannot help. The message is left out: it may quote a value of the file.
            logger.error(
                "de-identifying instance %s for center %s failed with %s\n%s",
                original.pk,
                copy.center_id,
                exc.__class__.__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            return _settle(copy, DeidentifiedCopy.Status.FAILED, f"cannot be de-identified ({exc.__class__.__name__})")
        try:
            made = _store(spool, pseudonyms)
        except InvalidDicom as exc:
            return _settle(copy, DeidentifiedCopy.Status.FAILED, f"the de-identified file is not valid DICOM: {exc}")
    try:
        with transaction.atomic():
            claimed = DeidentifiedCopy.objects.filter(pk=copy.pk, status=DeidentifiedCopy.Status.PENDING).update(
                status=DeidentifiedCopy.Status.MADE, made_at=timezone.now(), reason=""
            )
            if not claimed:
                dicom_storage().delete(made.name)
                return None
            instance = _index(copy=copy, made=made)
            DeidentifiedCopy.objects.filter(pk=copy.pk).update(copy=instance)
            Delivery.objects.create(
                instance=instance,
                center=copy.center,
                priority=copy.priority,
                origin=copy.origin,
                whole_study=copy.whole_study,
            )
            notify.deliveries_queued([copy.center_id])
            audit_record(
                action="instance.deidentify",
                center=original.source_center,
                obj=copy,
                detail={"original": original.pk, "copy": instance.pk, "recipient": copy.center.slug},
            )
    except BaseException:
        dicom_storage().delete(made.name)
        raise
    logger.info("de-identified instance %s for center %s as instance %s", original.pk, copy.center_id, instance.pk)
    return DeidentifiedCopy.Status.MADE


def _store(spool, pseudonyms: Pseudonyms) -> _Made:
    """Save the spooled copy to storage (durably, as an upload is), hashed; its header read as an upload's is."""
    spool.flush()
    header = read_header(spool.name, max_inflated=settings.DICOM_MAX_UPLOAD_BYTES)
    digest, size = hashlib.sha256(), 0
    spool.seek(0)
    while chunk := spool.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    spool.seek(0)
    name = dicom_storage().save(f"instances/{timezone.now():%Y/%m/%d}/{uuid.uuid4().hex}.dcm", File(spool))
    return _Made(name=name, size=size, sha256=digest.hexdigest(), header=header, pseudonyms=pseudonyms)


def _index(*, copy: DeidentifiedCopy, made: _Made) -> Instance:
    original, recipient, header = copy.original, copy.center, made.header
    publisher = original.source_center
    series = series_index(header=header, publisher=publisher, derived_for=recipient)
    study = series.study
    if study.derived_for_id != recipient.pk or study.study_instance_uid != header.study_instance_uid:
        raise ValueError(f"de-identified copy {copy.pk}: its study or series UID is already another center's")
    _pseudonyms_record(publisher=publisher, recipient=recipient, pseudonyms=made.pseudonyms)
    return Instance.objects.create(
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        series=series,
        source_center=publisher,
        instance_number=header.instance_number,
        transfer_syntax_uid=header.transfer_syntax_uid,
        file=made.name,
        size=made.size,
        sha256=made.sha256,
        routing_key=original.routing_key,
        # Never fanned out itself: the sweep of unrouted instances must not pick it up.
        routed_at=timezone.now(),
        priority=copy.priority,
        derived_from=original,
        derived_for=recipient,
    )


def _pseudonyms_record(*, publisher: Center, recipient: Center, pseudonyms: Pseudonyms) -> None:
    Pseudonym.objects.bulk_create(
        [
            Pseudonym(publisher=publisher, recipient=recipient, kind=kind, original=original, pseudonym=new)
            for kind, (original, new) in (
                (Pseudonym.Kind.PATIENT, pseudonyms.patient_id),
                (Pseudonym.Kind.STUDY, pseudonyms.study_instance_uid),
                (Pseudonym.Kind.SERIES, pseudonyms.series_instance_uid),
                (Pseudonym.Kind.INSTANCE, pseudonyms.sop_instance_uid),
            )
        ],
        ignore_conflicts=True,
    )


def _settle(copy: DeidentifiedCopy, status: str, reason: str) -> str | None:
    """A copy that will never be made (held, or failed for good), with the reason its publisher sees."""
    with transaction.atomic():
        changed = DeidentifiedCopy.objects.filter(pk=copy.pk, status=DeidentifiedCopy.Status.PENDING).update(
            status=status, reason=reason[:500]
        )
        if not changed:
            return None
        audit_record(
            action="instance.deidentify_hold" if status == DeidentifiedCopy.Status.HELD else "instance.deidentify_fail",
            center=copy.original.source_center,
            obj=copy,
            detail={"original": copy.original_id, "recipient": copy.center.slug, "reason": reason[:500]},
        )
    log = logger.warning if status == DeidentifiedCopy.Status.HELD else logger.error
    log("de-identified copy %s of instance %s is %s: %s", copy.pk, copy.original_id, status, reason)
    return status


def deidentified_copies_queue_pending(*, older_than: timedelta, batch: int = 500) -> int:
    """The sweep: queue again the copies still pending after `older_than` (their task was lost).

    Like the sweep of unrouted instances: each runs as its own task, with its
    retries and dead letter; a dead-lettered one waits for an administrator.
    """
    from routing.selectors import instances_dead_lettered
    from routing.services import task_queue
    from routing.tasks import deidentify_copy

    cutoff = timezone.now() - older_than
    pending = list(
        DeidentifiedCopy.objects.filter(status=DeidentifiedCopy.Status.PENDING, created_at__lte=cutoff)
        .exclude(pk__in=instances_dead_lettered(task_name=DEIDENTIFY_TASK))
        .order_by("-priority", "created_at")
        .values_list("pk", "priority")[:batch]
    )
    queued = 0
    for copy_id, priority in pending:
        try:
            # Stat copies go to the stat queue, as at fan-out: a lost stat copy must not wait behind routine work.
            deidentify_copy.apply_async((copy_id,), queue=task_queue(priority))
        except Exception:
            if not deidentify_copy.app.conf.task_always_eager:
                raise
            logger.exception("sweep: de-identifying copy %s failed", copy_id)
            continue
        queued += 1
    if queued:
        logger.warning("sweep queued %d de-identified copy(ies) still pending", queued)
    return queued
