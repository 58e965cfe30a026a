import hashlib
import json

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

from centers.models import ApiKey, Center
from routing.patterns import InvalidPattern, pattern_validate


def validate_pattern(value: str) -> None:
    try:
        pattern_validate(value)
    except InvalidPattern as exc:
        raise ValidationError(str(exc)) from None


class Priority(models.IntegerChoices):
    """How urgently a publisher wants an instance delivered: stat deliveries are leased first."""

    ROUTINE = 0, "routine"
    STAT = 1, "stat"


class Patient(models.Model):
    """A patient as known to the publishing center: IDs are only unique there.

    A de-identified copy's patient is a row of its own, `derived_for` the recipient,
    under the pseudonymous ID that recipient knows.
    """

    center = models.ForeignKey(Center, on_delete=models.PROTECT, related_name="patients")
    patient_id = models.CharField(max_length=64, blank=True)
    name = models.CharField(max_length=324, blank=True)
    birth_date = models.DateField(null=True, blank=True)
    sex = models.CharField(max_length=16, blank=True)
    derived_for = models.ForeignKey(Center, null=True, blank=True, on_delete=models.PROTECT, related_name="+")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["center", "patient_id"],
                condition=Q(derived_for__isnull=True),
                name="patient_unique_id_at_center",
            ),
            models.UniqueConstraint(
                fields=["center", "derived_for", "patient_id"],
                condition=Q(derived_for__isnull=False),
                name="patient_unique_pseudonym_per_recipient",
            ),
        ]
        indexes = [models.Index(fields=["patient_id"]), models.Index(fields=["name"])]

    def __str__(self) -> str:
        return f"{self.name or '(no name)'} [{self.patient_id or '-'}]"


class Study(models.Model):
    study_instance_uid = models.CharField("Study Instance UID", max_length=64, unique=True)
    patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="studies")
    source_center = models.ForeignKey(Center, on_delete=models.PROTECT, related_name="published_studies")
    study_date = models.DateField(null=True, blank=True)
    study_time = models.CharField(max_length=16, blank=True)
    accession_number = models.CharField(max_length=64, blank=True)
    description = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Set on a de-identified copy: the only center that sees it. The publisher's own pages leave it out.
    derived_for = models.ForeignKey(Center, null=True, blank=True, on_delete=models.PROTECT, related_name="+")

    class Meta:
        verbose_name_plural = "studies"
        indexes = [models.Index(fields=["study_date"]), models.Index(fields=["accession_number"])]

    def __str__(self) -> str:
        return f"{self.description or 'Study'} {self.study_instance_uid}"


class Series(models.Model):
    series_instance_uid = models.CharField("Series Instance UID", max_length=64, unique=True)
    study = models.ForeignKey(Study, on_delete=models.PROTECT, related_name="series")
    modality = models.CharField(max_length=16, db_index=True)
    series_number = models.IntegerField(null=True, blank=True)
    description = models.CharField(max_length=200, blank=True)
    body_part = models.CharField(max_length=64, blank=True)

    class Meta:
        verbose_name_plural = "series"

    def __str__(self) -> str:
        return f"{self.modality} {self.description or self.series_instance_uid}"


class Instance(models.Model):
    """One stored DICOM file. Its bytes live once in storage, whoever receives it."""

    sop_instance_uid = models.CharField("SOP Instance UID", max_length=64, unique=True)
    sop_class_uid = models.CharField("SOP Class UID", max_length=64)
    series = models.ForeignKey(Series, on_delete=models.PROTECT, related_name="instances")
    source_center = models.ForeignKey(Center, on_delete=models.PROTECT, related_name="published_instances")
    uploaded_with = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    instance_number = models.IntegerField(null=True, blank=True)
    transfer_syntax_uid = models.CharField(max_length=64)
    # Indexed for the orphan sweep's question: does any row name this stored file?
    file = models.CharField(max_length=255, db_index=True, help_text="Name in the DICOM storage.")
    size = models.BigIntegerField()
    sha256 = models.CharField("SHA-256", max_length=64)
    routing_key = models.CharField(max_length=255, db_index=True)
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)
    routed_at = models.DateTimeField(null=True, blank=True, help_text="When the fan-out ran; empty until then.")
    priority = models.PositiveSmallIntegerField(
        choices=Priority.choices, default=Priority.ROUTINE, help_text="What the publisher asked for its deliveries."
    )
    # A de-identified copy made for one recipient: never fanned out itself, never shown to the publisher.
    derived_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="derived_copies"
    )
    derived_for = models.ForeignKey(Center, null=True, blank=True, on_delete=models.PROTECT, related_name="+")

    class Meta:
        indexes = [
            # The sweep's question: what was committed but never fanned out?
            models.Index(fields=["received_at"], condition=Q(routed_at__isnull=True), name="instance_unrouted"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["derived_from", "derived_for"],
                condition=Q(derived_from__isnull=False),
                name="instance_one_copy_per_recipient",
            )
        ]

    def __str__(self) -> str:
        return self.sop_instance_uid


class Subscription(models.Model):
    class Deidentify(models.TextChoices):
        NONE = "none", "None: the images as published"
        BASIC = "basic", "Basic: PS3.15 Basic Application Level Confidentiality Profile"

    class Deliver(models.TextChoices):
        INSTANCE = "instance", "Each instance as it arrives"
        STUDY = "study", "Whole studies, once stable"

    center = models.ForeignKey(Center, on_delete=models.CASCADE, related_name="subscriptions")
    pattern = models.CharField(
        max_length=255,
        validators=[validate_pattern],
        help_text="Over <region>.<city>.<modality>: '*' is one word, '#' zero or more (e.g. fars.*.ct, fars.#, #.nm).",
    )
    deidentify = models.CharField(
        max_length=16,
        choices=Deidentify.choices,
        default=Deidentify.NONE,
        db_default=Deidentify.NONE,
        help_text="When another pattern of the center matches too, the stricter choice wins.",
    )
    deliver = models.CharField(
        max_length=16,
        choices=Deliver.choices,
        default=Deliver.INSTANCE,
        db_default=Deliver.INSTANCE,
        help_text="Whole studies wait until no instance of the study arrived for STUDY_STABLE_SECONDS.",
    )
    is_active = models.BooleanField(default=True)
    note = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["center__name", "pattern"]
        constraints = [models.UniqueConstraint(fields=["center", "pattern"], name="subscription_unique_pattern")]

    def __str__(self) -> str:
        return f"{self.center.slug}: {self.pattern}{'' if self.is_active else ' (inactive)'}"


class RoutingDecision(models.Model):
    """Why a center received an instance: the subscription and pattern that matched."""

    # decision_unique_per_pattern begins with instance: a second index of it would cost every fan-out row.
    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="routing_decisions", db_index=False)
    center = models.ForeignKey(Center, on_delete=models.CASCADE, related_name="+")
    subscription = models.ForeignKey(Subscription, null=True, on_delete=models.SET_NULL, related_name="decisions")
    pattern = models.CharField(max_length=255, help_text="The pattern as it was when it matched.")
    routing_key = models.CharField(max_length=255)
    decided_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["instance", "center", "pattern"], name="decision_unique_per_pattern")
        ]

    def __str__(self) -> str:
        return f"{self.routing_key} matched {self.pattern!r} of {self.center_id}"


class Delivery(models.Model):
    """An instance owed to one receiving center: a reference, never a copy of the bytes."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        LEASED = "leased", "In flight"
        DELIVERED = "delivered", "Delivered"
        # Terminal until an administrator retries it: it could never succeed as it was.
        FAILED = "failed", "Failed"

    class Origin(models.TextChoices):
        LIVE = "live", "Live"
        BACKFILL = "backfill", "Backfill"

    # The instance this center receives: the published one, or the copy de-identified for it.
    # Neither key has an index of its own: delivery_unique_per_center begins with instance and
    # delivery_queue with center, and every fan-out row, lease and ack writes each index.
    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="deliveries", db_index=False)
    center = models.ForeignKey(Center, on_delete=models.CASCADE, related_name="deliveries", db_index=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    priority = models.PositiveSmallIntegerField(choices=Priority.choices, default=Priority.ROUTINE, db_default=0)
    origin = models.CharField(max_length=16, choices=Origin.choices, default=Origin.LIVE, db_default="live")
    whole_study = models.BooleanField(
        default=False, db_default=False, help_text="Leasable only once its study is stable (deliver: study)."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    lease_token = models.UUIDField(null=True, blank=True, editable=False)
    leased_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0, help_text="How many times it was leased.")
    # db_default: the fan-out inserts deliveries with its own SQL, naming only the columns it sets.
    mismatches = models.PositiveIntegerField(
        default=0, db_default=0, help_text="How many times the receiver reported other bytes."
    )
    delivered_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)

    class Meta:
        verbose_name_plural = "deliveries"
        constraints = [models.UniqueConstraint(fields=["instance", "center"], name="delivery_unique_per_center")]
        indexes = [
            models.Index(fields=["center", "status", "id"], name="delivery_queue"),
            models.Index(fields=["center", "status", "-priority", "-origin", "id"], name="delivery_queue_priority"),
            # Only leased rows carry a token: a queued or delivered one costs this index nothing.
            models.Index(fields=["lease_token"], name="delivery_lease", condition=Q(lease_token__isnull=False)),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.instance_id} → {self.center_id} ({self.status})"


class DeidentifiedCopy(models.Model):
    """The copy of one instance de-identified for one recipient: made once, then delivered like any instance.

    Pending until a worker makes it; held when it must not be sent at all (burned-in
    annotation), which the publisher sees with the reason.
    """

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        MADE = "made", "Made"
        HELD = "held", "Held"
        FAILED = "failed", "Failed"

    original = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="deidentifications")
    center = models.ForeignKey(Center, on_delete=models.CASCADE, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_default="pending")
    copy = models.OneToOneField(Instance, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # What the delivery of the copy will carry, decided at fan-out.
    priority = models.PositiveSmallIntegerField(choices=Priority.choices, default=Priority.ROUTINE, db_default=0)
    origin = models.CharField(
        max_length=16, choices=Delivery.Origin.choices, default=Delivery.Origin.LIVE, db_default="live"
    )
    whole_study = models.BooleanField(default=False, db_default=False)
    reason = models.CharField(max_length=500, blank=True, db_default="")
    created_at = models.DateTimeField(auto_now_add=True)
    made_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "de-identified copy"
        constraints = [models.UniqueConstraint(fields=["original", "center"], name="deidentified_copy_once")]
        indexes = [models.Index(fields=["status", "created_at"], name="deidentified_copy_status")]

    def __str__(self) -> str:
        return f"{self.original_id} for {self.center_id} ({self.status})"


class Pseudonym(models.Model):
    """What one recipient knows an original identifier as. Only the publisher's administrators may look it up."""

    class Kind(models.TextChoices):
        PATIENT = "patient", "Patient ID"
        STUDY = "study", "Study Instance UID"
        SERIES = "series", "Series Instance UID"
        INSTANCE = "instance", "SOP Instance UID"

    publisher = models.ForeignKey(Center, on_delete=models.CASCADE, related_name="+")
    recipient = models.ForeignKey(Center, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    original = models.CharField(max_length=64)
    pseudonym = models.CharField(max_length=64, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # Patient IDs are unique only at their publisher: two publishers' patient "1234" are two patients.
            models.UniqueConstraint(
                fields=["publisher", "recipient", "kind", "original"], name="pseudonym_once_per_recipient"
            )
        ]

    def __str__(self) -> str:
        return f"{self.kind} pseudonym for {self.recipient_id}"


class StudyWebhook(models.Model):
    """One POST owed to a center's webhook: a study complete for that center, with each attempt's outcome.

    Complete means the study is stable and every delivery of it to that center is delivered.
    An instance delivered later completes the study again: a new row, with the new count.
    """

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed"

    center = models.ForeignKey(Center, on_delete=models.CASCADE, related_name="study_webhooks")
    # The study as that center knows it: a de-identified copy's study for a de-identifying center.
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="+")
    instances = models.PositiveIntegerField(help_text="Instances of the study delivered to the center.")
    completed_at = models.DateTimeField(help_text="When the last of them was delivered.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True, db_index=True)
    last_error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["center", "study", "instances"], name="study_webhook_once_per_count")
        ]

    def __str__(self) -> str:
        return f"{self.center_id}: study {self.study_id} ({self.instances} instances, {self.status})"


class DeadLetter(models.Model):
    """A background task that failed for good: one row per task and arguments, however often it failed.

    Arguments are kept only when they are numbers (primary keys), never text that
    could carry patient data; a row with other arguments cannot be retried.
    """

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        RETRIED = "retried", "Retried"

    task_name = models.CharField(max_length=200, db_index=True)
    task_id = models.CharField(max_length=64, blank=True, help_text="The last failed run.")
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    retryable = models.BooleanField(default=True, help_text="False when arguments had to be left out.")
    fingerprint = models.CharField(max_length=64, unique=True, editable=False)
    exception_class = models.CharField(max_length=200)
    message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    failures = models.PositiveIntegerField(default=1)
    first_failed_at = models.DateTimeField()
    last_failed_at = models.DateTimeField(db_index=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN, db_index=True)
    retried_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-last_failed_at"]
        verbose_name = "dead-lettered task"

    def __str__(self) -> str:
        return f"{self.task_name}{tuple(self.args)} {self.exception_class}"

    @staticmethod
    def fingerprint_of(*, task_name: str, args: list, kwargs: dict) -> str:
        return hashlib.sha256(json.dumps([task_name, list(args), kwargs], sort_keys=True).encode()).hexdigest()
