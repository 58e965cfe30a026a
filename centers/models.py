import secrets
from datetime import datetime, timedelta

from django.conf import settings
from django.core.validators import RegexValidator, URLValidator
from django.db import models

# Slugs become words of a routing key, so they may not hold the separator.
slug_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9_-]*$", "Use lowercase letters, digits, '-' and '_' only (no dots or spaces)."
)
modality_validator = RegexValidator(r"^[A-Z0-9]{1,16}$", "A DICOM modality code: uppercase letters and digits.")


def _new_salt() -> str:
    return secrets.token_hex(16)


class Region(models.Model):
    slug = models.CharField(max_length=64, unique=True, validators=[slug_validator])
    name = models.CharField(max_length=200)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class City(models.Model):
    region = models.ForeignKey(Region, on_delete=models.PROTECT, related_name="cities")
    slug = models.CharField(max_length=64, validators=[slug_validator])
    name = models.CharField(max_length=200)

    class Meta:
        ordering = ["region__name", "name"]
        verbose_name_plural = "cities"
        constraints = [models.UniqueConstraint(fields=["region", "slug"], name="city_unique_slug_in_region")]

    def __str__(self) -> str:
        return f"{self.name} ({self.region.name})"

    @property
    def key_prefix(self) -> str:
        """The first two words of every routing key published from this city."""
        return f"{self.region.slug}.{self.slug}"


class Modality(models.Model):
    """A defined term of Modality (0008,0060)."""

    code = models.CharField(max_length=16, unique=True, validators=[modality_validator])
    name = models.CharField(max_length=200)

    class Meta:
        ordering = ["code"]
        verbose_name_plural = "modalities"

    def __str__(self) -> str:
        return f"{self.code} — {self.name}"


class Center(models.Model):
    slug = models.CharField(max_length=64, unique=True, validators=[slug_validator])
    name = models.CharField(max_length=200)
    city = models.ForeignKey(City, on_delete=models.PROTECT, related_name="centers")
    may_publish = models.BooleanField(default=False, help_text="May upload images to the exchange.")
    may_subscribe = models.BooleanField(default=False, help_text="May receive images through subscriptions.")
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    webhook_url = models.URLField(
        "webhook URL",
        max_length=500,
        blank=True,
        validators=[URLValidator(schemes=["http", "https"])],
        help_text="Gets a signed POST when a study is complete for this center (README, Webhooks). Empty: none.",
    )
    # The webhook's secret is derived from SECRET_KEY and this salt (centers.webhooks), never
    # stored; a new salt is a new secret.
    webhook_salt = models.CharField(max_length=64, default=_new_salt, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    """Which center a portal user works for, and as what."""

    class Role(models.TextChoices):
        CLINICIAN = "clinician", "Clinician"
        CENTER_ADMIN = "center_admin", "Center administrator"

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="membership")
    center = models.ForeignKey(Center, on_delete=models.CASCADE, related_name="members")
    role = models.CharField(max_length=20, choices=Role.choices, default=Role.CLINICIAN)

    def __str__(self) -> str:
        return f"{self.user} at {self.center} ({self.get_role_display()})"


class ApiKey(models.Model):
    """A center's secret for the REST API and its agent.

    Only the SHA-256 digest is stored: the key is a long random secret, so a
    plain digest lookup is safe and costs microseconds per request.
    """

    center = models.ForeignKey(Center, on_delete=models.CASCADE, related_name="api_keys")
    label = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=12, help_text="The first characters, to tell keys apart.")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.center.slug})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class AuditEvent(models.Model):
    """One row per access to patient data or change of state, never updated."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    action = models.CharField(max_length=64, db_index=True)
    center = models.ForeignKey(Center, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    object_type = models.CharField(max_length=64, blank=True)
    object_id = models.CharField(max_length=128, blank=True, db_index=True)
    address = models.GenericIPAddressField(null=True, blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.action} {self.object_type} {self.object_id}"


class AgentHeartbeat(models.Model):
    """The latest heartbeat of one site agent: a center may run agents on several machines."""

    # Offline once this many heartbeat intervals pass without one, and never sooner than the floor.
    MISSED_BEATS = 3
    OFFLINE_FLOOR_SECONDS = 120

    center = models.ForeignKey(Center, on_delete=models.CASCADE, related_name="agents")
    hostname = models.CharField(max_length=255)
    version = models.CharField(max_length=32)
    roles = models.JSONField(default=list, blank=True)
    interval = models.PositiveIntegerField(default=60, help_text="Seconds between heartbeats.")
    spool_count = models.PositiveIntegerField(default=0, help_text="Instances waiting for upload in the spool.")
    spool_bytes = models.PositiveBigIntegerField(default=0)
    spool_failed = models.PositiveIntegerField(
        default=0, help_text="Spooled instances set aside in spool/failed/: refused, or failing too long."
    )
    spool_retrying = models.PositiveIntegerField(
        default=0, help_text="Spooled instances that failed and wait for their next attempt."
    )
    outbox_pending = models.PositiveIntegerField(default=0)
    outbox_failed = models.PositiveIntegerField(
        default=0, help_text="Outbox files set aside in failed/: refused, or failing too long."
    )
    outbox_retrying = models.PositiveIntegerField(
        default=0, help_text="Outbox files that failed and wait for their next attempt."
    )
    last_failure_at = models.DateTimeField(null=True, blank=True, help_text="When the agent last set a file aside.")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    address = models.GenericIPAddressField(null=True, blank=True)
    first_seen_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["center__name", "hostname"]
        verbose_name = "agent"
        constraints = [models.UniqueConstraint(fields=["center", "hostname"], name="agent_unique_host_per_center")]

    def __str__(self) -> str:
        return f"{self.center} agent on {self.hostname}"

    @property
    def offline_after(self) -> timedelta:
        return timedelta(seconds=max(self.MISSED_BEATS * self.interval, self.OFFLINE_FLOOR_SECONDS))

    def is_online(self, now: datetime) -> bool:
        return now - self.last_seen_at <= self.offline_after

    @property
    def failed(self) -> int:
        """Files this agent set aside (refused for good, or failing past its bounds), waiting for a person."""
        return self.spool_failed + self.outbox_failed

    @property
    def retrying(self) -> int:
        return self.spool_retrying + self.outbox_retrying
