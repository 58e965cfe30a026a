import os

from celery import Celery
from celery.signals import task_failure, task_prerun
from celery.utils.log import get_task_logger

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("portal", task_cls="celery.contrib.django.task:DjangoTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Celery's Django fix-up otherwise closes the database connection, and with psycopg's
# pool the whole pool, before and after every task: each fan-out paid for a new
# PostgreSQL connection and more CPU than the routing itself. A prefork child runs one
# task at a time, so it keeps its connection; _drop_broken_connections replaces one
# that failed. (The fix-up reads this old-style key verbatim.)
app.conf["CELERY_DB_REUSE_MAX"] = 1000
app.autodiscover_tasks()


@task_prerun.connect
def _drop_broken_connections(**kwargs) -> None:
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        if connection.errors_occurred and not connection.is_usable():
            connection.close()


@task_failure.connect
def _dead_letter(sender=None, task_id=None, exception=None, args=None, kwargs=None, einfo=None, **extra) -> None:
    """A task that failed for good (not a retry) is recorded for the admin, from the worker
    or, for a worker lost mid-task, from the worker's main process."""
    from routing.upkeep import dead_letter_record

    try:
        dead_letter_record(
            task_name=getattr(sender, "name", str(sender)),
            task_id=task_id or "",
            args=args or (),
            kwargs=kwargs or {},
            exception=exception,
            traceback=str(einfo.traceback) if einfo is not None else "",
        )
    except Exception:
        # The database may be what failed; the sweep finds an unrouted instance again.
        get_task_logger(__name__).exception("could not record the dead letter of %s[%s]", sender, task_id)
