import os
import time

from amqp.exceptions import MessageNacked
from celery import Celery
from celery.contrib.django.task import DjangoTask
from celery.exceptions import Retry
from celery.signals import task_failure, task_prerun
from celery.utils.log import get_task_logger
from kombu.exceptions import OperationalError

# A quorum queue whose leader's node has just died refuses publishes (a publisher-confirm nack)
# until the surviving nodes have elected a new leader, which takes a moment: the pauses between
# sending again. A nack here means the broker did not take the task; what is still refused after
# these is left to the sweep, as when the broker is down.
NACK_PAUSES = (0.2, 0.5, 1.0, 2.0, 3.0)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")


class Task(DjangoTask):
    def apply_async(self, *args, **kwargs):
        for pause in (*NACK_PAUSES, None):
            try:
                return super().apply_async(*args, **kwargs)
            except OperationalError as exc:
                if pause is None or not isinstance(exc.__cause__, MessageNacked):
                    raise
                get_task_logger(__name__).warning("the broker refused %s; sending it again", self.name)
                time.sleep(pause)

    def apply(self, args=None, kwargs=None, *rest, **options):
        """Run here and then (no broker). A failure that propagates to the caller
        (task_eager_propagates) skips Celery's task_failure signal: record it here."""
        try:
            return super().apply(args, kwargs, *rest, **options)
        except Retry:
            raise
        except Exception as exc:
            _record(self, options.get("task_id") or "", args, kwargs, exc, "")
            raise


app = Celery("portal", task_cls=Task)
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
    _record(sender, task_id or "", args, kwargs, exception, str(einfo.traceback) if einfo is not None else "")


def _record(task, task_id: str, args, kwargs, exception: BaseException, traceback: str) -> None:
    from routing.upkeep import dead_letter_record

    try:
        dead_letter_record(
            task_name=getattr(task, "name", str(task)),
            task_id=task_id,
            args=args or (),
            kwargs=kwargs or {},
            exception=exception,
            traceback=traceback,
        )
    except Exception:
        # The database may be what failed; the sweep finds an unrouted instance again.
        get_task_logger(__name__).exception("could not record the dead letter of %s[%s]", task, task_id)
