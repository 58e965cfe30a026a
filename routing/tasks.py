from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError

from routing import batch, services, upkeep

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
def route_instances(instance_ids: list[int]) -> None:
    """The fan-out of one batch upload; a dead-lettered batch is left to the sweep, one instance per task."""
    batch.instances_route(instance_ids=instance_ids)


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
