from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError

from routing import services

# Only a lost or locked database is worth retrying; anything else is a bug
# that retrying would hide (and the sweep would meet it again anyway).
TRANSIENT = (OperationalError, InterfaceError)


@shared_task(
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=8,
)
def route_instance(instance_id: int) -> None:
    services.instance_route(instance_id=instance_id)


@shared_task(acks_late=True)
def sweep_unrouted() -> int:
    return services.instances_route_unrouted(older_than=timedelta(seconds=settings.SWEEP_GRACE_SECONDS))


@shared_task(acks_late=True)
def expire_leases() -> int:
    return services.deliveries_expire_leases()
