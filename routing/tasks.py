import logging
from datetime import date, timedelta

from celery import shared_task
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import InterfaceError, OperationalError

from routing import backfill, batch, deidentification_services, delivery_services, services, upkeep, webhooks
from routing.models import Subscription

# Only a lost or locked database is worth retrying; anything else is a bug
# that retrying would hide. What still fails after the retries, or fails
# otherwise, is dead-lettered (portal.celery) and shown in the admin.
TRANSIENT = (OperationalError, InterfaceError)
logger = logging.getLogger(__name__)


# The routing work done per instance: fan-outs and de-identified copies.
ROUTING_TASK = dict(
    acks_late=True,
    reject_on_worker_lost=True,
    # A message whose task kills its worker (out of memory, a crash in a C library)
    # would otherwise be redelivered forever: each loss is a retry, within max_retries,
    # after which the message is acknowledged and the task dead-lettered.
    retry_on_worker_lost=True,
    default_retry_delay=settings.TASK_RETRY_DELAY_SECONDS,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=settings.TASK_MAX_RETRIES,
)


@shared_task(**ROUTING_TASK)
def route_instance(instance_id: int) -> None:
    services.instance_route(instance_id=instance_id)


@shared_task(**ROUTING_TASK)
def deidentify_copy(copy_id: int) -> None:
    deidentification_services.deidentified_copy_make(copy_id=copy_id)


@shared_task(acks_late=True)
def sweep_pending_copies() -> int:
    return deidentification_services.deidentified_copies_queue_pending(
        older_than=timedelta(seconds=settings.SWEEP_GRACE_SECONDS)
    )


@shared_task(**ROUTING_TASK)
def route_instances(instance_ids: list[int]) -> None:
    """The fan-out of one batch upload; a dead-lettered batch is left to the sweep, one instance per task."""
    batch.instances_route(instance_ids=instance_ids)


@shared_task(acks_late=True)
def sweep_unrouted() -> int:
    return services.instances_route_unrouted(older_than=timedelta(seconds=settings.SWEEP_GRACE_SECONDS))


@shared_task(acks_late=True)
def expire_leases() -> int:
    return delivery_services.deliveries_expire_leases()


@shared_task(acks_late=True)
def sweep_orphan_files() -> int:
    return len(
        upkeep.storage_sweep_orphans(
            grace=timedelta(seconds=settings.ORPHAN_GRACE_SECONDS),
            lookback_days=settings.ORPHAN_SWEEP_DAYS,
            batch=settings.ORPHAN_SWEEP_BATCH,
        )
    )


@shared_task(acks_late=True)
def study_webhooks() -> int:
    """Record the studies newly complete for centers with a webhook, and queue every POST that is due."""
    webhooks.studies_complete_record()
    due = webhooks.webhooks_due()
    for webhook_id in due:
        send_study_webhook.delay(webhook_id)
    return len(due)


@shared_task(acks_late=True, autoretry_for=TRANSIENT, retry_backoff=True, max_retries=settings.TASK_MAX_RETRIES)
def send_study_webhook(webhook_id: int) -> None:
    # The row holds the retries and their backoff: a failed POST is tried again by study_webhooks.
    webhooks.study_webhook_send(webhook_id=webhook_id)


@shared_task(acks_late=True, autoretry_for=TRANSIENT, retry_backoff=True, max_retries=settings.TASK_MAX_RETRIES)
def backfill_subscription(
    subscription_id: int,
    since: str,
    user_id: int | None = None,
    after: int = 0,
    queued: int = 0,
    batches: int = 0,
    keys: list[str] | None = None,
) -> None:
    """The admin's backfill of one subscription's pattern: one batch per task, then the next batch is queued
    behind whatever live work arrived meanwhile, so a long backfill never holds a worker slot for long."""
    subscription = Subscription.objects.select_related("center").filter(pk=subscription_id).first()
    if subscription is None:
        return
    center, day, pattern = subscription.center, date.fromisoformat(since), subscription.pattern
    user = get_user_model().objects.filter(pk=user_id).first() if user_id else None
    try:
        if backfill_subscription.app.conf.task_always_eager:
            # No broker and no other worker to share with: the whole run here, with its pauses.
            backfill.deliveries_backfill(center=center, since=day, pattern=pattern, user=user)
            return
        if keys is None:
            keys = backfill.backfill_keys(center=center, since=day, pattern=pattern)
        done = backfill.backfill_batch(center=center, since=day, keys=keys, pattern=pattern, after=after)
    except backfill.BackfillRefused as exc:
        # The center was deactivated between the admin's click and this run: nothing more to do.
        logger.warning("backfill of subscription %s stopped: %s", subscription_id, exc)
        backfill.backfill_audit(
            center=center, since=day, pattern=pattern, user=user, queued=queued, batches=batches, completed=False
        )
        return
    queued, batches = queued + done.queued, batches + 1
    if done.last_pk is None:
        backfill.backfill_audit(
            center=center, since=day, pattern=pattern, user=user, queued=queued, batches=batches, completed=True
        )
        return
    backfill_subscription.delay(subscription_id, since, user_id, done.last_pk, queued, batches, keys)
