from django.core.management.base import BaseCommand, CommandError

from centers.models import Center
from centers.services import apikey_issue


class Command(BaseCommand):
    help = "Issue a new API key for a center and print it (only the key, on stdout). It cannot be shown again."

    def add_arguments(self, parser):
        parser.add_argument("center", help="the center's slug")
        parser.add_argument("--label", default="", help="a note to tell this key apart, e.g. 'agent on pacs-gw-1'")

    def handle(self, *args, center: str, label: str, **options):
        found = Center.objects.filter(slug=center).first()
        if found is None:
            raise CommandError(f"No center with slug {center!r}.")
        issued = apikey_issue(center=found, label=label or "issued with manage.py issue_key")
        self.stdout.write(issued.secret)
