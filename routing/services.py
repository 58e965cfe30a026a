"""Writes of the exchange: ingest, fan-out and subscriptions (the delivery queue's: routing.delivery_services)."""

import hashlib
import logging
import tempfile
import traceback
import uuid
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import BinaryIO

from django.conf import settings
from django.core.files import File
from django.core.files.storage import storages
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from centers.models import ApiKey, Center
from centers.services import audit_record
from portal.metrics import observe_ingest
from routing import notify
from routing.dicom import (
    PREAMBLE_SIZE,
    DicomHeader,
    InflatedTooLarge,
    InvalidDicom,
    preamble_executable,
    read_header,
    read_header_stream,
)
from routing.fanout import fanout_write
from routing.models import (
    DeidentifiedCopy,
    Delivery,
    Instance,
    Patient,
    Priority,
    Series,
    Study,
    Subscription,
)
from routing.patterns import (
    InvalidPattern,
    SubscriptionRef,
    pattern_validate,
    recipient_options,
    recipients,
    route,
    routing_key,
    routing_key_valid,
)

logger = logging.getLogger(__name__)
_CHUNK = 1024 * 1024


class IngestError(Exception):
    """An upload the portal refuses; `status` is the HTTP answer."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidUpload(IngestError):
    status = 400


class UploadTooLarge(IngestError):
    status = 413


class InstanceConflict(IngestError):
    status = 409


@dataclass(frozen=True)
class IngestResult:
    instance: Instance
    created: bool


def dicom_storage():
    return storages["dicom"]


class StoredFileMissing(Exception):
    """An instance's row is committed but its file is gone from storage (lost disk, manual removal)."""

    def __init__(self, instance: Instance) -> None:
        super().__init__(f"The stored file of SOP Instance {instance.sop_instance_uid} is missing at the portal.")
        self.instance = instance


def instance_open(instance: Instance):
    """The instance's stored file, opened for reading; StoredFileMissing if storage has lost it.

    Callers that cannot answer for themselves let it reach portal.views.server_error,
    which answers 410 with that sentence instead of a 500.
    """
    try:
        return dicom_storage().open(instance.file, "rb")
    except FileNotFoundError:
        logger.error("stored file %s of instance %s is missing", instance.file, instance.pk)
        raise StoredFileMissing(instance) from None


@observe_ingest
def instance_ingest(
    *,
    stream: BinaryIO,
    api_key: ApiKey | None = None,
    center: Center | None = None,
    user=None,
    address: str | None = None,
    priority: int = Priority.ROUTINE,
) -> IngestResult:
    """Store one uploaded Part-10 file once, index it, and queue its fan-out.

    The bytes are spooled to a temporary file and hashed on the way, never held
    whole in memory. The row commits only after the file is durable in storage,
    and the file is removed again if the row does not commit. The publisher is
    the key's center, or `center` for a logged-in clinician's upload (no key).
    A preamble holding an executable's header is stored zeroed (CVE-2019-11687),
    so the hash, the stored and the delivered bytes are those of the zeroed file.
    `priority` is copied onto the instance's deliveries; a stat upload of a file already
    stored raises that instance to stat (instance_raise_priority).
    """
    if api_key is not None:
        center = api_key.center
    if center is None:
        raise ValueError("instance_ingest needs an api_key or a center")
    limit = settings.DICOM_MAX_UPLOAD_BYTES
    with tempfile.NamedTemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR, prefix="upload-", suffix=".dcm") as spool:
        sha256, size, executable = _spool(stream, spool, limit)
        if size == 0:
            raise InvalidUpload("The upload is empty: send one DICOM Part-10 file as the request body.")
        header = upload_header_read(path=spool.name, limit=limit)
        if executable:
            logger.warning(
                "an upload from center %s had an executable header (%s) in its DICOM preamble; stored with it zeroed",
                center.pk,
                executable,
            )
        detail = {"preamble_zeroed": executable} if executable else None
        existing = _already_stored(header.sop_instance_uid, sha256)
        if existing is not None:
            with transaction.atomic():
                raised = instance_raise_priority(instance=existing, center=center, priority=priority)
                audit_record(
                    action="instance.republish",
                    center=center,
                    user=user,
                    api_key=api_key,
                    obj=existing,
                    address=address,
                    detail={**(detail or {}), "raised_to_stat": raised} if raised is not None else detail,
                )
            return IngestResult(instance=existing, created=False)

        spool.seek(0)
        name = dicom_storage().save(f"instances/{timezone.now():%Y/%m/%d}/{uuid.uuid4().hex}.dcm", File(spool))
        try:
            with transaction.atomic():
                instance = _index(
                    header=header,
                    center=center,
                    api_key=api_key,
                    name=name,
                    size=size,
                    sha256=sha256,
                    priority=priority,
                )
                audit_record(
                    action="instance.publish",
                    center=center,
                    user=user,
                    api_key=api_key,
                    obj=instance,
                    address=address,
                    detail=detail,
                )
                # robust: once committed, a broker outage must not turn the
                # upload into an error; the sweep routes what was not queued.
                transaction.on_commit(partial(_queue_route, instance.pk, priority), robust=True)
        except IntegrityError:
            dicom_storage().delete(name)
            # Another upload of the same SOP Instance UID committed first.
            existing = _already_stored(header.sop_instance_uid, sha256)
            if existing is None:
                raise
            return IngestResult(instance=existing, created=False)
        except BaseException:
            dicom_storage().delete(name)
            raise
    return IngestResult(instance=instance, created=True)


def upload_header_read(*, path: str | None = None, stream: BinaryIO | None = None, limit: int) -> DicomHeader:
    """The header of a spooled upload (or its bytes in memory), or the IngestError that refuses it (never another)."""
    try:
        if stream is not None:
            return read_header_stream(stream, max_inflated=limit)
        return read_header(path, max_inflated=limit)
    except InvalidDicom as exc:
        raise InvalidUpload(str(exc)) from None
    except InflatedTooLarge as exc:
        raise UploadTooLarge(str(exc)) from None
    except Exception as exc:
        # The reader is meant to turn every malformed file into InvalidDicom;
        # one it missed is still the client's bytes, never a server error. The
        # message is left out of the log: it may quote a value of the file.
        logger.error(
            "the DICOM header reader failed on an upload with %s; refused with 400\n%s",
            exc.__class__.__name__,
            "".join(traceback.format_tb(exc.__traceback__)),
        )
        raise InvalidUpload(
            f"The DICOM header cannot be read: the file is malformed ({exc.__class__.__name__})."
        ) from None


def _spool(stream: BinaryIO, target: BinaryIO, limit: int) -> tuple[str, int, str | None]:
    """Copy and hash the upload; (sha256, size, the executable whose preamble was zeroed)."""
    writer = UploadWriter(target, limit)
    while chunk := stream.read(_CHUNK):
        writer.write(chunk)
    sha256 = writer.end()
    target.flush()
    return sha256, writer.size, writer.executable


class UploadWriter:
    """An upload's bytes to `target` as they come: hashed, counted against the limit, an executable preamble zeroed.

    The single upload pulls its body through it (_spool); a batch's parts are pushed
    through it as they arrive (routing.batch.BatchReceiver).
    """

    def __init__(self, target: BinaryIO, limit: int) -> None:
        self.target = target
        self.limit = limit
        self.size = 0
        self.executable: str | None = None
        self._digest = hashlib.sha256()
        self._head: bytearray | None = bytearray()  # the preamble and "DICM", held until they can be checked

    def write(self, chunk: bytes | memoryview) -> None:
        if self._head is not None:
            wanted = PREAMBLE_SIZE + 4 - len(self._head)
            self._head += chunk[:wanted]
            if len(self._head) < PREAMBLE_SIZE + 4:
                return
            self._write(self._checked_head())
            chunk = memoryview(chunk)[wanted:]
        if chunk:
            self._write(chunk)

    def end(self) -> str:
        """The SHA-256 of what was written, once the body has ended."""
        if self._head is not None:
            self._write(self._checked_head())
        return self._digest.hexdigest()

    def _checked_head(self) -> bytes:
        head, self._head = bytes(self._head), None
        self.executable = preamble_executable(head)
        if self.executable:
            head = bytes(PREAMBLE_SIZE) + head[PREAMBLE_SIZE:]
        return head

    def _write(self, chunk: bytes | memoryview) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise UploadTooLarge(f"The upload is larger than this portal's limit of {self.limit} bytes.")
        self._digest.update(chunk)
        self.target.write(chunk)


def _already_stored(sop_instance_uid: str, sha256: str) -> Instance | None:
    existing = Instance.objects.filter(sop_instance_uid=sop_instance_uid).first()
    if existing is None:
        return None
    if existing.sha256 != sha256:
        raise InstanceConflict(
            f"SOP Instance UID {sop_instance_uid} is already stored with different content "
            f"(SHA-256 {existing.sha256}); a changed image needs a new SOP Instance UID."
        )
    return existing


def _index(
    *,
    header: DicomHeader,
    center: Center,
    api_key: ApiKey | None,
    name: str,
    size: int,
    sha256: str,
    priority: int = Priority.ROUTINE,
) -> Instance:
    known = (
        Series.objects.select_related("study__patient").filter(series_instance_uid=header.series_instance_uid).first()
    )
    # Most uploads belong to a series already indexed: one read instead of three.
    series = known if series_takes(known, header) else _series_get_or_create(header=header, center=center)
    instance = upload_row(
        header=header,
        series=series,
        center=center,
        api_key=api_key,
        name=name,
        size=size,
        sha256=sha256,
        priority=priority,
    )
    instance.save(force_insert=True)
    return instance


def series_takes(series: Series | None, header: DicomHeader) -> bool:
    """Whether an indexed series takes this upload: the header's study, and never a de-identified copy's."""
    return (
        series is not None
        and series.study.study_instance_uid == header.study_instance_uid
        and series.study.derived_for_id is None
    )


def upload_row(
    *,
    header: DicomHeader,
    series: Series,
    center: Center,
    api_key: ApiKey | None,
    name: str,
    size: int,
    sha256: str,
    priority: int,
) -> Instance:
    """The row of an uploaded instance, not saved yet: single uploads create it, batches insert many at once."""
    city = center.city
    return Instance(
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        series=series,
        source_center=center,
        uploaded_with=api_key,
        instance_number=header.instance_number,
        transfer_syntax_uid=header.transfer_syntax_uid,
        file=name,
        size=size,
        sha256=sha256,
        routing_key=routing_key(region=city.region.slug, city=city.slug, modality=header.modality),
        priority=priority,
    )


def _series_get_or_create(*, header: DicomHeader, center: Center) -> Series:
    series = series_index(header=header, publisher=center)
    if series.study.derived_for_id is not None or series.study.study_instance_uid != header.study_instance_uid:
        raise InvalidUpload(
            f"Series {header.series_instance_uid} already belongs to another study than {header.study_instance_uid}."
        )
    return series


def series_index(*, header: DicomHeader, publisher: Center, derived_for: Center | None = None) -> Series:
    """The patient, study and series rows of a header, found or made; `derived_for` for a de-identified copy's.

    The series returned may belong to another study (or another recipient's copy) than the
    header says: each caller refuses that in its own words.
    """
    patient, _ = Patient.objects.get_or_create(
        center=publisher,
        derived_for=derived_for,
        patient_id=header.patient_id,
        defaults={"name": header.patient_name, "birth_date": header.patient_birth_date, "sex": header.patient_sex},
    )
    study, _ = Study.objects.get_or_create(
        study_instance_uid=header.study_instance_uid,
        defaults={
            "patient": patient,
            "source_center": publisher,
            "derived_for": derived_for,
            "study_date": header.study_date,
            "study_time": header.study_time,
            "accession_number": header.accession_number,
            "description": header.study_description,
        },
    )
    series, _ = Series.objects.select_related("study").get_or_create(
        series_instance_uid=header.series_instance_uid,
        defaults={
            "study": study,
            "modality": header.modality,
            "series_number": header.series_number,
            "description": header.series_description,
            "body_part": header.body_part,
        },
    )
    return series


def instance_raise_priority(*, instance: Instance, center: Center, priority: int) -> int | None:
    """A stat upload of an instance already stored: the instance and what is still owed of it become stat.

    Only its publisher may raise it, and a priority is never lowered (a routine re-send,
    such as an agent's retry, leaves a stat instance stat). Returns how many deliveries
    and pending copies were raised, or None when nothing changed.
    """
    if priority != Priority.STAT or instance.source_center_id != center.pk:
        return None
    if not Instance.objects.filter(pk=instance.pk, priority__lt=priority).update(priority=priority):
        return None
    instance.priority = priority
    owed = [Delivery.Status.QUEUED, Delivery.Status.LEASED]
    # A de-identified copy's deliveries are the copy's; they are owed for this original all the same.
    deliveries = Delivery.objects.filter(
        Q(instance=instance) | Q(instance__derived_from=instance), status__in=owed, priority__lt=priority
    )
    raised = list(deliveries.values_list("center_id", flat=True))
    count = deliveries.update(priority=priority)
    count += DeidentifiedCopy.objects.filter(
        original=instance, status=DeidentifiedCopy.Status.PENDING, priority__lt=priority
    ).update(priority=priority)
    notify.deliveries_queued(set(raised))
    if instance.routed_at is None:
        # Its fan-out may still wait in the routine queue: queue it again where stat work goes (idempotent).
        transaction.on_commit(partial(_queue_route, instance.pk, priority), robust=True)
    return count


def task_queue(priority: int) -> str:
    """The Celery queue of a task done for an instance of this priority: stat work has its own queue and workers."""
    return settings.CELERY_STAT_QUEUE if priority >= Priority.STAT else settings.CELERY_TASK_DEFAULT_QUEUE


def _queue_route(instance_id: int, priority: int = Priority.ROUTINE) -> None:
    from routing.tasks import route_instance

    route_instance.apply_async((instance_id,), queue=task_queue(priority))


class Unroutable(Exception):
    """An instance whose stored routing key no pattern can be trusted to match."""


def instance_route(*, instance_id: int) -> int | None:
    """Fan an instance out to every subscribed center; None if already routed or gone.

    Idempotent: the unrouted row is claimed under a lock, and the unique
    constraints on deliveries, copies and decisions make a second run a no-op.
    """
    with transaction.atomic():
        instance = Instance.objects.select_for_update().filter(pk=instance_id, routed_at__isnull=True).first()
        if instance is None:
            return None
        if not routing_key_valid(instance.routing_key):
            raise Unroutable(
                f"Instance {instance.pk} has the routing key {instance.routing_key!r}, "
                "not <region>.<city>.<modality>: it is not routed."
            )
        matches = route(instance.routing_key, subscriptions_active(), exclude_center_id=instance.source_center_id)
        fanout = fanout_write(
            instance=instance,
            matches=matches,
            options=recipient_options(matches),
            priority=instance.priority,
            origin=Delivery.Origin.LIVE,
            mark_routed=True,
        )
    logger.info(
        "routed %s (%s) to %d center(s)", instance.sop_instance_uid, instance.routing_key, len(recipients(matches))
    )
    return len(fanout.delivery_centers) + len(fanout.copy_ids)


def subscriptions_active() -> list[SubscriptionRef]:
    """Every subscription that can match now: active, of an active center allowed to receive."""
    return [
        SubscriptionRef(
            subscription_id=pk, center_id=center_id, pattern=pattern, deidentify=deidentify, deliver=deliver
        )
        for pk, center_id, pattern, deidentify, deliver in Subscription.objects.filter(
            is_active=True, center__is_active=True, center__may_subscribe=True
        ).values_list("pk", "center_id", "pattern", "deidentify", "deliver")
    ]


ROUTE_TASK = "routing.tasks.route_instance"


def instances_route_unrouted(*, older_than: timedelta, batch: int = 500) -> int:
    """The sweep: queue the fan-out of instances that committed but were never routed.

    Each one runs as its own route_instance task, with that task's retries and
    dead letter, so an instance that cannot be routed (or kills its worker) holds
    up no other. One whose routing is dead-lettered waits for an administrator's
    retry instead of failing again every minute. Without a broker the tasks run
    here and then; a failure is recorded and the sweep goes on.
    """
    from routing.selectors import instances_dead_lettered
    from routing.tasks import route_instance

    cutoff = timezone.now() - older_than
    pending = list(
        Instance.objects.filter(routed_at__isnull=True, received_at__lte=cutoff)
        .exclude(pk__in=instances_dead_lettered(task_name=ROUTE_TASK))
        # Stat first, and to the stat queue: a backlog of routine fan-outs must not hold them up here either.
        .order_by("-priority", "received_at")
        .values_list("pk", "priority")[:batch]
    )
    queued = 0
    for instance_id, priority in pending:
        try:
            route_instance.apply_async((instance_id,), queue=task_queue(priority))
        except Exception:
            if not route_instance.app.conf.task_always_eager:
                raise  # the broker refused it: the next sweep tries again
            # Ran here and failed: its failure handler recorded a dead letter.
            logger.exception("sweep: the fan-out of instance %s failed", instance_id)
            continue
        queued += 1
    if queued:
        logger.warning("sweep queued the fan-out of %d instance(s) whose fan-out had not run", queued)
    return queued


@dataclass(frozen=True)
class SubscriptionSpec:
    """One item of a center's `subscriptions` in network.yaml."""

    pattern: str
    deidentify: str = Subscription.Deidentify.NONE
    deliver: str = Subscription.Deliver.INSTANCE


SUBSCRIPTION_KEYS = ("pattern", "deidentify", "deliver")


def subscription_spec_parse(item: object) -> SubscriptionSpec:
    """A pattern string, or a mapping such as {pattern: "fars.#", deidentify: basic, deliver: study}.

    Raises InvalidPattern with a sentence naming what is wrong.
    """
    if isinstance(item, str):
        item = {"pattern": item}
    if not isinstance(item, dict):
        raise InvalidPattern(f"A subscription is a pattern or a mapping with {', '.join(SUBSCRIPTION_KEYS)}: {item!r}")
    unknown = sorted(str(k) for k in item if k not in SUBSCRIPTION_KEYS)
    if unknown:
        raise InvalidPattern(
            f"Unknown subscription option(s) {', '.join(unknown)}: use {', '.join(SUBSCRIPTION_KEYS)}."
        )
    pattern = str(item.get("pattern") or "").strip().lower()
    pattern_validate(pattern)
    deidentify = str(item.get("deidentify", Subscription.Deidentify.NONE)).strip().lower()
    if deidentify not in Subscription.Deidentify.values:
        raise InvalidPattern(
            f"deidentify of {pattern!r} is {deidentify!r}: use one of {', '.join(Subscription.Deidentify.values)}."
        )
    deliver = str(item.get("deliver", Subscription.Deliver.INSTANCE)).strip().lower()
    if deliver not in Subscription.Deliver.values:
        raise InvalidPattern(
            f"deliver of {pattern!r} is {deliver!r}: use one of {', '.join(Subscription.Deliver.values)}."
        )
    return SubscriptionSpec(pattern=pattern, deidentify=deidentify, deliver=deliver)


@transaction.atomic
def subscriptions_sync(*, center: Center, patterns: list[str | dict | SubscriptionSpec]) -> int:
    """Make a center's active subscriptions exactly these (pattern strings or options mappings)."""
    wanted = [p if isinstance(p, SubscriptionSpec) else subscription_spec_parse(p) for p in patterns]
    for spec in wanted:
        Subscription.objects.update_or_create(
            center=center,
            pattern=spec.pattern,
            defaults={"is_active": True, "deidentify": spec.deidentify, "deliver": spec.deliver},
        )
    Subscription.objects.filter(center=center, is_active=True).exclude(
        pattern__in=[spec.pattern for spec in wanted]
    ).update(is_active=False)
    return len({spec.pattern for spec in wanted})


def subscriptions_set_active(*, subscriptions, active: bool, user=None) -> int:
    with transaction.atomic():
        changed = list(subscriptions.exclude(is_active=active).select_related("center"))
        for subscription in changed:
            Subscription.objects.filter(pk=subscription.pk).update(is_active=active)
            audit_record(
                action="subscription.activate" if active else "subscription.deactivate",
                center=subscription.center,
                user=user,
                obj=subscription,
                detail={"pattern": subscription.pattern},
            )
    return len(changed)
