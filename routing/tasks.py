from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError

from routing import deidentification_services, services, upkeep, webhooks

# Only a lost or locked database is worth retrying; anything else is a bug
# that retrying would hide. What still fails after the retries, or fails
# otherwise, is dead-lettered (portal.celery) and shown in the admin.
TRANSIENT = (OperationalError, InterfaceError)


@shared_task(
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
def route_instance(instance_id: int) -> None:
    services.instance_route(instance_id=instance_id)


@shared_task(
    acks_late=True,
    reject_on_worker_lost=True,
    retry_on_worker_lost=True,
    default_retry_delay=settings.TASK_RETRY_DELAY_SECONDS,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=settings.TASK_MAX_RETRIES,
)
def deidentify_copy(copy_id: int) -> None:
    deidentification_services.deidentified_copy_make(copy_id=copy_id)


@shared_task(acks_late=True)
def sweep_pending_copies() -> int:
    return deidentification_services.deidentified_copies_queue_pending(
        older_than=timedelta(seconds=settings.SWEEP_GRACE_SECONDS)
    )


@shared_task(acks_late=True)
def sweep_unrouted() -> int:
    return services.instances_route_unrouted(older_than=timedelta(seconds=settings.SWEEP_GRACE_SECONDS))


@shared_task(acks_late=True)
def expire_leases() -> int:
    return services.deliveries_expire_leases()


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
