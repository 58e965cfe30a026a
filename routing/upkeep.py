"""Writes of the periodic upkeep: dead-lettered tasks and files no row names.

Kept apart from routing.services, whose writes serve requests and the fan-out;
these serve the administrator and the periodic work.
"""

import logging
import re
import traceback as tb
from collections.abc import Iterator
from datetime import timedelta

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from centers.services import audit_events_record, audit_record
from routing.models import DeadLetter, Instance
from routing.services import dicom_storage

logger = logging.getLogger(__name__)

# Only what a task's arguments should ever be: primary keys and flags. Text could
# carry patient data, and a dead letter is kept for an administrator to read.
_KEPT = (int, float, bool, type(None))
_OMITTED = "<omitted>"
_MESSAGE_LIMIT = 2000
_TRACEBACK_LIMIT = 20000


def _scrub(values) -> tuple[list | dict, bool]:
    if isinstance(values, dict):
        kept = {str(k): (v if isinstance(v, _KEPT) else _OMITTED) for k, v in values.items()}
        return kept, all(isinstance(v, _KEPT) for v in values.values())
    kept = [v if isinstance(v, _KEPT) else _OMITTED for v in values]
    return kept, all(isinstance(v, _KEPT) for v in values)


def _without(text: str, values: list[str]) -> str:
    """The text with the omitted arguments blanked out: an exception often quotes its input."""
    for value in sorted(values, key=len, reverse=True):
        if value:
            text = text.replace(value, _OMITTED)
    return text


def dead_letter_record(
    *,
    task_name: str,
    task_id: str = "",
    args=(),
    kwargs=None,
    exception: BaseException,
    traceback: str = "",
) -> DeadLetter:
    """Record that a task failed for good: a new row, or one more failure on the row of
    the same task and arguments (open again if it had been retried)."""
    omitted = [str(v) for v in [*(args or ()), *(kwargs or {}).values()] if not isinstance(v, _KEPT)]
    args, args_ok = _scrub(list(args or ()))
    kwargs, kwargs_ok = _scrub(dict(kwargs or {}))
    fingerprint = DeadLetter.fingerprint_of(task_name=task_name, args=args, kwargs=kwargs)
    now = timezone.now()
    fields = {
        "task_id": task_id or "",
        "exception_class": f"{type(exception).__module__}.{type(exception).__qualname__}"[:200],
        "message": _without(str(exception), omitted)[:_MESSAGE_LIMIT],
        "traceback": _without(traceback or "".join(tb.format_exception(exception)), omitted)[-_TRACEBACK_LIMIT:],
        "last_failed_at": now,
        "status": DeadLetter.Status.OPEN,
    }
    with transaction.atomic():
        letter = DeadLetter.objects.select_for_update().filter(fingerprint=fingerprint).first()
        if letter is None:
            letter, created = DeadLetter.objects.get_or_create(
                fingerprint=fingerprint,
                defaults={
                    **fields,
                    "task_name": task_name,
                    "args": args,
                    "kwargs": kwargs,
                    "retryable": args_ok and kwargs_ok,
                    "first_failed_at": now,
                },
            )
            if created:
                audit_record(action="task.dead_letter", obj=letter, detail={"task": task_name, "args": args})
                return letter
        for name, value in fields.items():
            setattr(letter, name, value)
        letter.failures += 1
        letter.save(update_fields=[*fields, "failures"])
        audit_record(action="task.dead_letter", obj=letter, detail={"task": task_name, "failures": letter.failures})
    return letter


def dead_letters_retry(*, dead_letters: QuerySet[DeadLetter], user=None) -> tuple[int, int]:
    """Queue the tasks again, as they were called; returns (queued, skipped).

    A row whose arguments had to be left out, or whose task this portal no longer
    has, is skipped. A task that fails again reopens its row.
    """
    from portal.celery import app

    with transaction.atomic():
        letters = list(
            DeadLetter.objects.select_for_update().filter(
                pk__in=dead_letters.values("pk"), status=DeadLetter.Status.OPEN
            )
        )
        runnable = [d for d in letters if d.retryable and d.task_name in app.tasks]
        now = timezone.now()
        DeadLetter.objects.filter(pk__in=[d.pk for d in runnable]).update(
            status=DeadLetter.Status.RETRIED, retried_at=now
        )
        audit_events_record(
            [
                {
                    "action": "task.retry",
                    "object_type": "deadletter",
                    "object_id": str(d.pk),
                    "detail": {"task": d.task_name, "args": d.args, "by": getattr(user, "username", "")},
                }
                for d in runnable
            ]
        )
    for letter in runnable:
        try:
            app.tasks[letter.task_name].apply_async(args=letter.args, kwargs=letter.kwargs)
        except Exception:
            # Without a broker the task runs here and then; its failure is recorded again.
            logger.exception("retry of dead-lettered %s%s failed", letter.task_name, tuple(letter.args))
    return len(runnable), len(letters) - len(runnable)


# instances/YYYY/MM/DD/<uuid hex>.dcm, as instance_ingest names them.
_STORED_NAME = re.compile(r"^[0-9a-f]{32}\.dcm$")


def _day_folders(*, now, grace: timedelta, lookback_days: int) -> Iterator[str]:
    """Newest first: the day folders from `lookback_days` before the grace's edge up to today."""
    day = now.date()
    oldest = (now - grace - timedelta(days=lookback_days)).date()
    while day >= oldest:
        yield f"instances/{day:%Y/%m/%d}"
        day -= timedelta(days=1)


def storage_sweep_orphans(*, grace: timedelta, lookback_days: int, batch: int) -> list[str]:
    """Delete stored files that no Instance row names and that are older than `grace`.

    A process killed between the storage write and the commit leaves such a file.
    An upload in flight is younger than the grace (its file's modification time
    moves while it is written, and the row commits right after the write), so
    it is never touched. Only the recent day folders are listed, and at most
    `batch` files without a row are examined per run, so the cost stays bounded
    however many files the storage holds. Works on any Django storage with
    listdir and get_modified_time (local disk, S3).
    """
    storage = dicom_storage()
    now = timezone.now()
    cutoff = now - grace
    removed: list[str] = []
    examined = 0
    for folder in _day_folders(now=now, grace=grace, lookback_days=lookback_days):
        try:
            _, files = storage.listdir(folder)
        except FileNotFoundError:
            continue
        names = [f"{folder}/{f}" for f in sorted(files) if _STORED_NAME.match(f)]
        for start in range(0, len(names), 1000):
            chunk = names[start : start + 1000]
            named = set(Instance.objects.filter(file__in=chunk).values_list("file", flat=True))
            for name in chunk:
                if name in named:
                    continue
                if examined >= batch:
                    return _orphans_removed(removed)
                examined += 1
                try:
                    modified = storage.get_modified_time(name)
                except Exception:
                    # Removed since the listing: local disk says FileNotFoundError, S3 a
                    # ClientError 404. Anything else, with the file still there, is real.
                    if not storage.exists(name):
                        continue
                    raise
                # Re-asked per file: a row may have committed since the chunk was read.
                if modified < cutoff and not Instance.objects.filter(file=name).exists():
                    storage.delete(name)
                    audit_record(
                        action="storage.orphan_delete",
                        object_type="file",
                        object_id=name[:128],
                        detail={"modified": modified.isoformat()},
                    )
                    removed.append(name)
    return _orphans_removed(removed)


def _orphans_removed(removed: list[str]) -> list[str]:
    if removed:
        logger.warning("orphan sweep removed %d stored file(s) no instance names: %s", len(removed), removed[:20])
    return removed
