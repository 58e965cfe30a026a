import logging
import signal
import time

from django.core.management.base import BaseCommand

from portal.celery import app

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Run Celery beat's schedule (the routing sweep, lease expiry, the orphan file sweep) in this process. "
        "For the embedded set-up without a broker; with RabbitMQ, run 'celery -A portal beat' "
        "or a worker with -B instead."
    )

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="run every periodic task once and exit")

    def handle(self, *args, once: bool, **options):
        app.loader.import_default_modules()
        schedule = app.conf.beat_schedule
        next_run = {name: 0.0 for name in schedule}
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        while not stopping:
            now = time.monotonic()
            for name, entry in schedule.items():
                if now < next_run[name]:
                    continue
                try:
                    app.tasks[entry["task"]].apply(throw=True)
                except Exception:
                    logger.exception("periodic task %s failed", name)
                next_run[name] = now + float(entry["schedule"])
            if once:
                return
            time.sleep(max(0.1, min(next_run.values()) - time.monotonic()))
