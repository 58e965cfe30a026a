"""Webhooks of studies complete for a center: found by a periodic task, each POSTed by a task of its own.

A study is complete for a center once it is stable (no new instance for
STUDY_STABLE_SECONDS) and every delivery of it to that center is delivered.
Each POST is signed with the center's webhook secret (centers.webhooks) and
recorded in a StudyWebhook row: attempts, the last error, the next attempt.
"""

import json
import logging
from datetime import timedelta

import httpx
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, Exists, F, Max, OuterRef, Q, QuerySet
from django.utils import timezone

from centers.models import Center
from centers.services import audit_record
from centers.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, webhook_secret, webhook_signature
from routing.models import DeidentifiedCopy, Delivery, Instance, StudyWebhook

logger = logging.getLogger(__name__)

# Studies whose last delivery is older than this are not looked at again: the scan stays
# bounded, and a center that registers a webhook is told about the last day's studies only.
LOOKBACK = timedelta(days=1)
RETRY_CAP_SECONDS = 3600
EVENT = "study.complete"


def studies_complete_record(*, now=None) -> list[int]:
    """A pending StudyWebhook for each study newly complete for a center with a webhook; their ids."""
    now = now or timezone.now()
    centers = Center.objects.filter(is_active=True).exclude(webhook_url="")
    recent = Delivery.objects.filter(
        center__in=centers, status=Delivery.Status.DELIVERED, delivered_at__gte=now - LOOKBACK
    ).values("instance__series__study_id")
    unstable = Instance.objects.filter(
        series__study_id=OuterRef("instance__series__study_id"),
        received_at__gt=now - timedelta(seconds=settings.STUDY_STABLE_SECONDS),
    )
    complete = list(
        Delivery.objects.filter(center__in=centers, instance__series__study_id__in=recent)
        .exclude(Exists(unstable))
        .values("center_id", "instance__series__study_id")
        .annotate(
            total=Count("pk"),
            delivered=Count("pk", filter=Q(status=Delivery.Status.DELIVERED)),
            last=Max("delivered_at"),
        )
        .filter(total=F("delivered"))
    )
    copying = _still_copying({(row["center_id"], row["instance__series__study_id"]) for row in complete})
    complete = [row for row in complete if (row["center_id"], row["instance__series__study_id"]) not in copying]
    known = set(
        StudyWebhook.objects.filter(study_id__in={row["instance__series__study_id"] for row in complete}).values_list(
            "center_id", "study_id", "instances"
        )
    )
    created = []
    for row in complete:
        center_id, study_id, count = row["center_id"], row["instance__series__study_id"], row["delivered"]
        if (center_id, study_id, count) in known:
            continue
        try:
            with transaction.atomic():
                hook = StudyWebhook.objects.create(
                    center_id=center_id,
                    study_id=study_id,
                    instances=count,
                    completed_at=row["last"],
                    next_attempt_at=now,
                )
        except IntegrityError:
            continue  # another run recorded it first
        created.append(hook.pk)
    return created


def _still_copying(pairs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The (center, copy study) pairs among `pairs` with a copy for that center of the original study still to make."""
    if not pairs:
        return set()
    originals: dict[tuple[int, int], set[int]] = {}
    for study_id, center_id, original_study_id in (
        Instance.objects.filter(
            series__study_id__in={study for _, study in pairs}, derived_from__isnull=False, derived_for__isnull=False
        )
        .values_list("series__study_id", "derived_for_id", "derived_from__series__study_id")
        .distinct()
    ):
        originals.setdefault((center_id, original_study_id), set()).add(study_id)
    if not originals:
        return set()
    pending = DeidentifiedCopy.objects.filter(
        status=DeidentifiedCopy.Status.PENDING,
        center_id__in={center for center, _ in originals},
        original__series__study_id__in={study for _, study in originals},
    ).values_list("center_id", "original__series__study_id")
    still = set()
    for center_id, original_study_id in set(pending):
        still |= {(center_id, study) for study in originals.get((center_id, original_study_id), ())}
    return still


def webhooks_due(*, now=None) -> list[int]:
    now = now or timezone.now()
    return list(
        StudyWebhook.objects.filter(status=StudyWebhook.Status.PENDING, next_attempt_at__lte=now)
        .order_by("next_attempt_at")
        .values_list("pk", flat=True)[:500]
    )


def webhook_body(hook: StudyWebhook) -> bytes:
    return json.dumps(
        {
            "event": EVENT,
            "id": hook.pk,
            "center": hook.center.slug,
            "study_instance_uid": hook.study.study_instance_uid,
            "instances": hook.instances,
            "completed_at": hook.completed_at.isoformat(),
        },
        separators=(",", ":"),
    ).encode()


def retry_delay(attempts: int) -> float:
    """After `attempts` failed attempts: WEBHOOK_RETRY_SECONDS, doubled each time, at most an hour."""
    return min(RETRY_CAP_SECONDS, settings.WEBHOOK_RETRY_SECONDS * 2 ** (attempts - 1))


def study_webhook_send(*, webhook_id: int) -> str | None:
    """POST one due webhook once and record the outcome; None if it is not due (sent, failed, or claimed)."""
    now = timezone.now()
    # The claim: a second task queued for the same row finds it not due and does nothing.
    claimed = StudyWebhook.objects.filter(
        pk=webhook_id, status=StudyWebhook.Status.PENDING, next_attempt_at__lte=now
    ).update(next_attempt_at=now + timedelta(seconds=settings.WEBHOOK_TIMEOUT_SECONDS * 3))
    if not claimed:
        return None
    hook = StudyWebhook.objects.select_related("center", "study").get(pk=webhook_id)
    url = hook.center.webhook_url
    error = _post(hook, url) if url else "the center has no webhook URL any more"
    attempts = hook.attempts + 1
    if not error:
        status, next_attempt = StudyWebhook.Status.SENT, None
    elif attempts >= settings.WEBHOOK_MAX_ATTEMPTS or not url:
        status, next_attempt = StudyWebhook.Status.FAILED, None
    else:
        status, next_attempt = StudyWebhook.Status.PENDING, now + timedelta(seconds=retry_delay(attempts))
    StudyWebhook.objects.filter(pk=hook.pk).update(
        status=status,
        attempts=attempts,
        last_error=error[:500],
        next_attempt_at=next_attempt,
        sent_at=timezone.now() if not error else None,
    )
    if error:
        logger.warning(
            "webhook %s of center %s, attempt %d: %s (%s)", hook.pk, hook.center.slug, attempts, error, status
        )
    return status


def _post(hook: StudyWebhook, url: str) -> str:
    """The error of one POST, or "" when the receiver answered 2xx."""
    body = webhook_body(hook)
    timestamp = str(int(timezone.now().timestamp()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "dicom-exchange-webhook",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: webhook_signature(secret=webhook_secret(hook.center), timestamp=timestamp, body=body),
    }
    try:
        # Redirects are never followed: the signed body must go only where the center said.
        response = httpx.post(
            url, content=body, headers=headers, timeout=settings.WEBHOOK_TIMEOUT_SECONDS, follow_redirects=False
        )
    except httpx.HTTPError as exc:
        return f"{exc.__class__.__name__}: {exc}"
    if 200 <= response.status_code < 300:
        return ""
    if response.is_redirect:
        return f"answered {response.status_code} to {response.headers.get('location', '?')}: redirects are not followed"
    return f"answered {response.status_code} {response.reason_phrase}"


def study_webhooks_retry(*, webhooks: QuerySet[StudyWebhook], user=None) -> int:
    """Try failed webhooks again from a fresh count of attempts, each audited."""
    with transaction.atomic():
        retried = list(
            StudyWebhook.objects.filter(pk__in=webhooks.values("pk"), status=StudyWebhook.Status.FAILED)
            .select_related("center")
            .select_for_update(of=("self",))
        )
        StudyWebhook.objects.filter(pk__in=[h.pk for h in retried]).update(
            status=StudyWebhook.Status.PENDING, attempts=0, next_attempt_at=timezone.now()
        )
        for hook in retried:
            audit_record(
                action="webhook.retry", center=hook.center, user=user, obj=hook, detail={"was": hook.last_error}
            )
    return len(retried)
