from pathlib import Path

import yaml
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from centers.services import NetworkFileError, network_load
from routing.patterns import InvalidPattern


class Command(BaseCommand):
    help = "Create or update regions, cities, centers and subscriptions from a YAML network file (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path)

    def handle(self, *args, file: Path, **options):
        try:
            data = yaml.safe_load(file.read_text())
        except OSError as exc:
            raise CommandError(f"Cannot read {file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise CommandError(f"{file} is not valid YAML: {exc}") from None
        try:
            counts = network_load(data=data)
        except (NetworkFileError, InvalidPattern) as exc:
            raise CommandError(f"{file}: {exc}") from None
        except ValidationError as exc:
            raise CommandError(f"{file}: {'; '.join(exc.messages)}") from None
        self.stdout.write(
            f"Loaded {counts['regions']} regions, {counts['cities']} cities, "
            f"{counts['centers']} centers, {counts['subscriptions']} subscriptions."
        )
