import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import transaction

from centers.models import ApiKey, Center
from centers.services import apikey_issue, apikey_revoke

DEMO_LABEL = "demo (make run)"


class Command(BaseCommand):
    help = (
        "Load the demo network, (re)set the demo administrator's password and issue fresh demo agent keys, "
        "printing both. Earlier demo keys are revoked: keys are stored only as digests, so they cannot be shown again."
    )

    def add_arguments(self, parser):
        parser.add_argument("--network", type=Path, default=Path(settings.BASE_DIR) / "demo" / "network.yaml")
        parser.add_argument("--username", default="admin")

    def handle(self, *args, network: Path, username: str, **options):
        call_command("load_network", str(network), stdout=self.stdout)
        password = secrets.token_urlsafe(12)
        with transaction.atomic():
            user, _ = get_user_model().objects.get_or_create(username=username)
            user.is_staff = user.is_superuser = user.is_active = True
            user.set_password(password)
            user.save()
            for key in ApiKey.objects.filter(label=DEMO_LABEL, revoked_at__isnull=True):
                apikey_revoke(api_key=key)
            issued = [
                (center, apikey_issue(center=center, label=DEMO_LABEL).secret)
                for center in Center.objects.filter(is_active=True).order_by("slug")
            ]
        self.stdout.write("")
        self.stdout.write(f"Administrator: {username} / {password}")
        self.stdout.write("Demo agent keys (shown once; `make run` issues new ones each time):")
        for center, secret in issued:
            roles = "/".join(
                r for r, ok in (("publish", center.may_publish), ("subscribe", center.may_subscribe)) if ok
            )
            self.stdout.write(f"  {center.slug:<20} {roles:<18} {secret}")
