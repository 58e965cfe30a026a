from datetime import date

from django.core.management.base import BaseCommand, CommandError

from centers.models import Center
from routing.backfill import BackfillRefused, deliveries_backfill
from routing.patterns import InvalidPattern


def _day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise CommandError(f"--since {value!r} is not a date: write it as YYYY-MM-DD.") from None


class Command(BaseCommand):
    help = (
        "Queue a center's deliveries of the stored instances received since a date that match its active "
        "subscriptions (or --pattern), at routine priority, in batches. Running it again queues nothing new."
    )

    def add_arguments(self, parser):
        parser.add_argument("center", help="The receiving center's slug.")
        parser.add_argument("--since", required=True, type=_day, help="YYYY-MM-DD: instances received from then on.")
        parser.add_argument("--pattern", help="Instead of the center's subscriptions, instances matching this pattern.")
        parser.add_argument("--batch", type=int, default=500, help="Instances per transaction (default 500).")

    def handle(self, *args, center: str, since: date, pattern: str | None, batch: int, **options):
        receiver = Center.objects.filter(slug=center).first()
        if receiver is None:
            raise CommandError(f"No center has the slug {center!r}.")
        if batch < 1:
            raise CommandError("--batch must be at least 1.")
        if pattern is None and not receiver.subscriptions.filter(is_active=True).exists():
            self.stderr.write(f"{receiver.slug} has no active subscription: nothing matches (or give --pattern).")
        try:
            queued = deliveries_backfill(center=receiver, since=since, pattern=pattern, batch=batch)
        except (BackfillRefused, InvalidPattern) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Queued {queued} deliveries for {receiver.slug}.")
