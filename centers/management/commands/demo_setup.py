import io
import logging
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import transaction
from django.db.models import Count

from centers.models import ApiKey, Center, Membership
from centers.services import apikey_issue, apikey_revoke
from demo.studies import PATIENT_NAME, STUDY_UID, demo_files
from routing.models import Delivery
from routing.services import instance_ingest

DEMO_LABEL = "demo (make run)"
PUBLISHER = "shiraz-imaging"
# One clinician where the demo study is published and one where it is received.
CLINICIANS = {"shiraz-imaging": "dr-shiraz", "tehran-hospital": "dr-tehran"}


class Command(BaseCommand):
    help = (
        "Load the demo network, (re)set the passwords of the demo administrator and clinicians, issue fresh demo "
        "agent keys, publish the synthetic demo study through the exchange, and print the logins and keys. "
        "Earlier demo keys are revoked: keys are stored only as digests, so they cannot be shown again."
    )

    def add_arguments(self, parser):
        parser.add_argument("--network", type=Path, default=Path(settings.BASE_DIR) / "demo" / "network.yaml")
        parser.add_argument("--username", default="admin")

    def handle(self, *args, network: Path, username: str, **options):
        call_command("load_network", str(network), stdout=self.stdout)
        users = get_user_model().objects
        with transaction.atomic():
            admin_password = secrets.token_urlsafe(12)
            admin, _ = users.get_or_create(username=username)
            admin.is_staff = admin.is_superuser = admin.is_active = True
            admin.set_password(admin_password)
            admin.save()
            clinicians = []
            for center in Center.objects.filter(slug__in=CLINICIANS, is_active=True).order_by("slug"):
                password = secrets.token_urlsafe(12)
                user, _ = users.get_or_create(username=CLINICIANS[center.slug])
                user.is_active = True
                user.set_password(password)
                user.save()
                Membership.objects.update_or_create(
                    user=user, defaults={"center": center, "role": Membership.Role.CLINICIAN}
                )
                clinicians.append((center, user.username, password))
            for key in ApiKey.objects.filter(label=DEMO_LABEL, revoked_at__isnull=True):
                apikey_revoke(api_key=key)
            issued = [
                (center, apikey_issue(center=center, label=DEMO_LABEL))
                for center in Center.objects.filter(is_active=True).order_by("slug")
            ]
        publisher_key = next((key.api_key for center, key in issued if center.slug == PUBLISHER), None)
        published = self._publish(publisher_key) if publisher_key is not None else None

        self.stdout.write("")
        self.stdout.write(f"Administrator: {username} / {admin_password}   (the Django admin at /admin/)")
        self.stdout.write("Demo clinicians (log in at /; new passwords on every run):")
        for center, clinician, password in clinicians:
            self.stdout.write(f"  {center.slug:<20} {clinician} / {password}   ({center.name})")
        if published is not None:
            self.stdout.write(published)
        self.stdout.write("Demo agent keys (shown once; `make run` issues new ones each time):")
        for center, key in issued:
            roles = "/".join(
                r for r, ok in (("publish", center.may_publish), ("subscribe", center.may_subscribe)) if ok
            )
            self.stdout.write(f"  {center.slug:<20} {roles:<18} {key.secret}")

    def _publish(self, api_key: ApiKey) -> str:
        """Upload the demo study as the publisher's agent would: the real ingest, then fan-out."""
        new = total = 0
        # A log line per instance would bury the logins printed next.
        logging.disable(logging.INFO)
        try:
            for _, data in demo_files():
                new += instance_ingest(stream=io.BytesIO(data), api_key=api_key).created
                total += 1
        finally:
            logging.disable(logging.NOTSET)
        summary = (
            f"Demo study {PATIENT_NAME} (synthetic CT and MR) published by {api_key.center.name}: "
            f"{new} new instance(s), {total - new} already stored."
        )
        routed = (
            Delivery.objects.filter(instance__series__study__study_instance_uid=STUDY_UID)
            .values("center__name")
            .annotate(n=Count("id"))
            .order_by("center__name")
        )
        # With a broker the fan-out runs on the worker, so the deliveries may still be on their way.
        return f"{summary}\n  routed to: " + (
            ", ".join(f"{row['center__name']} ({row['n']})" for row in routed) or "(queued)"
        )
