import logging
import os
import select
import signal
import time

from django.core.management.base import BaseCommand

from portal.celery import app

logger = logging.getLogger(__name__)


class StopRequest:
    """Set by SIGTERM or SIGINT; `wait` sleeps until its timeout or the signal, whichever comes first.

    Not a threading.Event: the handler runs in the main thread, between two bytecodes of
    whatever it interrupts, and Event.set takes the lock that Event.wait may be holding
    there, which would deadlock. A pipe has no lock: the handler writes a byte and the
    select() the sleep is waiting in returns at once. time.sleep cannot be cut short:
    since PEP 475 it resumes after a handler that does not raise.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self.requested = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of earlier wake-ups: the sleep is already over

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as a stop was requested."""
        if not self.requested:
            select.select([self._read], [], [], max(0.0, seconds))
        return self.requested


class Command(BaseCommand):
    help = (
        "Run Celery beat's schedule (the routing sweep, lease expiry, the sweep of de-identified copies still "
        "pending, the orphan file sweep, the webhooks of complete studies) in this process. "
        "For the embedded set-up without a broker; with RabbitMQ, run 'celery -A portal beat' "
        "or a worker with -B instead. SIGTERM or Ctrl-C stops it at once, after the task "
        "that is running, if any."
    )

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="run every periodic task once and exit")

    def handle(self, *args, once: bool, **options):
        app.loader.import_default_modules()
        schedule = app.conf.beat_schedule
        next_run = {name: 0.0 for name in schedule}
        stop = StopRequest()
        logger.info("run_periodic: running %s; SIGTERM or Ctrl-C stops it", ", ".join(schedule))
        while not stop.requested:
            now = time.monotonic()
            for name, entry in schedule.items():
                if stop.requested:
                    break  # the task that was running has finished; start no other
                if now < next_run[name]:
                    continue
                try:
                    app.tasks[entry["task"]].apply(throw=True)
                except Exception:
                    logger.exception("periodic task %s failed", name)
                next_run[name] = now + float(entry["schedule"])
            if once:
                return
            stop.wait(max(0.1, min(next_run.values()) - time.monotonic()))
        logger.info("run_periodic: stopped")
