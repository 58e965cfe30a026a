from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from centers.models import Center, Membership


class Command(BaseCommand):
    help = "Create (or update) a portal user who works for a center, and set their password."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("center", help="the center's slug")
        parser.add_argument("--password", help="without it, you are asked for one")
        parser.add_argument("--role", choices=Membership.Role.values, default=Membership.Role.CLINICIAN)

    @transaction.atomic
    def handle(self, *args, username, center, password, role, **options):
        found = Center.objects.filter(slug=center).first()
        if found is None:
            raise CommandError(f"No center {center!r}.")
        if not password:
            from getpass import getpass

            password = getpass(f"Password for {username}: ")
        user, _ = get_user_model().objects.get_or_create(username=username)
        user.set_password(password)
        user.save()
        Membership.objects.update_or_create(user=user, defaults={"center": found, "role": role})
        self.stdout.write(f"{username} works for {found.name} as {role}.")
