from datetime import timedelta
from functools import partial

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.template.response import TemplateResponse
from django.utils import timezone

from routing.backfill import BackfillRefused, backfill_check
from routing.delivery_services import deliveries_retry
from routing.models import (
    DeadLetter,
    Delivery,
    Instance,
    Patient,
    RoutingDecision,
    Series,
    Study,
    StudyWebhook,
    Subscription,
)
from routing.services import subscriptions_set_active
from routing.tasks import backfill_subscription
from routing.upkeep import dead_letters_retry
from routing.webhooks import study_webhooks_retry

# The form's first suggestion: a month back, the usual "catch up on recent work" of a joining center.
BACKFILL_DEFAULT_DAYS = 30


class BackfillForm(forms.Form):
    since = forms.DateField(
        widget=forms.DateInput(attrs={"type": "date"}),
        initial=lambda: timezone.localdate() - timedelta(days=BACKFILL_DEFAULT_DAYS),
        help_text="Instances received from this day on are queued; what the center already has is skipped.",
    )


class SubscriptionInline(admin.TabularInline):
    model = Subscription
    extra = 0
    fields = ["pattern", "deidentify", "deliver", "is_active", "note"]


@admin.register(Subscription)
class SubscriptionAdmin(admin.ModelAdmin):
    list_display = ["center", "pattern", "deidentify", "deliver", "is_active", "note", "updated_at"]
    list_filter = ["is_active", "deidentify", "deliver", "center__city__region", "center"]
    search_fields = ["pattern", "center__name", "center__slug", "note"]
    actions = ["activate", "deactivate", "backfill"]
    change_list_template = "admin/routing/subscription/change_list.html"

    def get_urls(self):
        from django.urls import path

        from routing.preview import subscription_preview_view

        preview = path(
            "preview/",
            self.admin_site.admin_view(subscription_preview_view(self)),
            name="routing_subscription_preview",
        )
        return [preview, *super().get_urls()]

    @admin.action(description="Activate the selected subscriptions")
    def activate(self, request, queryset):
        changed = subscriptions_set_active(subscriptions=queryset, active=True, user=request.user)
        self.message_user(request, f"{changed} subscription(s) activated.")

    @admin.action(description="Deactivate the selected subscriptions")
    def deactivate(self, request, queryset):
        changed = subscriptions_set_active(subscriptions=queryset, active=False, user=request.user)
        self.message_user(request, f"{changed} subscription(s) deactivated.")

    @admin.action(description="Backfill the selected subscriptions (queue what was published since a date)")
    def backfill(self, request, queryset):
        """First a page asking from which day; then one background run per subscription."""
        form = BackfillForm(request.POST if "apply" in request.POST else None)
        if not form.is_valid():
            return TemplateResponse(
                request,
                "admin/routing/subscription/backfill.html",
                {
                    **self.admin_site.each_context(request),
                    "opts": self.model._meta,
                    "title": "Backfill subscriptions",
                    "form": form,
                    "subscriptions": queryset.select_related("center"),
                    "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
                },
            )
        since = form.cleaned_data["since"]
        queued = []
        for subscription in queryset.select_related("center"):
            try:
                if not subscription.is_active:
                    raise BackfillRefused(f"{subscription} is inactive: activate it first to backfill it.")
                backfill_check(center=subscription.center)
            except BackfillRefused as exc:
                self.message_user(request, str(exc), level=messages.ERROR)
                continue
            transaction.on_commit(
                partial(backfill_subscription.delay, subscription.pk, since.isoformat(), request.user.pk)
            )
            queued.append(subscription)
        if queued:
            self.message_user(
                request,
                f"Backfill since {since:%Y-%m-%d} started for {len(queued)} subscription(s) "
                f"({', '.join(str(s) for s in queued)}). Each run's count is in the audit log (delivery.backfill).",
            )
        return None


class ReadOnlyAdmin(admin.ModelAdmin):
    """Clinical records come from uploads, never from hand edits in the admin."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Patient)
class PatientAdmin(ReadOnlyAdmin):
    list_display = ["name", "patient_id", "birth_date", "sex", "center"]
    list_filter = ["center"]
    search_fields = ["name", "patient_id"]


@admin.register(Study)
class StudyAdmin(ReadOnlyAdmin):
    list_display = ["study_instance_uid", "patient", "study_date", "description", "source_center", "created_at"]
    list_filter = ["source_center", "study_date"]
    search_fields = ["study_instance_uid", "accession_number", "patient__patient_id", "patient__name", "description"]
    list_select_related = ["patient", "source_center"]


@admin.register(Series)
class SeriesAdmin(ReadOnlyAdmin):
    list_display = ["series_instance_uid", "modality", "series_number", "description", "study"]
    list_filter = ["modality"]
    search_fields = ["series_instance_uid", "study__study_instance_uid", "description"]
    list_select_related = ["study"]


class RoutingDecisionInline(admin.TabularInline):
    model = RoutingDecision
    extra = 0
    fields = ["center", "pattern", "subscription", "routing_key", "decided_at"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


class DeliveryInline(admin.TabularInline):
    model = Delivery
    extra = 0
    fields = ["center", "status", "attempts", "leased_at", "delivered_at", "last_error"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Instance)
class InstanceAdmin(ReadOnlyAdmin):
    list_display = ["sop_instance_uid", "routing_key", "source_center", "size", "received_at", "routed_at"]
    list_filter = ["source_center", "series__modality", ("routed_at", admin.EmptyFieldListFilter)]
    search_fields = ["sop_instance_uid", "series__series_instance_uid", "series__study__study_instance_uid", "sha256"]
    list_select_related = ["source_center"]
    date_hierarchy = "received_at"
    inlines = [RoutingDecisionInline, DeliveryInline]


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "instance",
        "center",
        "status",
        "attempts",
        "mismatches",
        "created_at",
        "delivered_at",
        "failed_at",
        "last_error",
        "why",
    ]
    list_filter = ["status", "center", "instance__source_center", ("failed_at", admin.EmptyFieldListFilter)]
    search_fields = ["instance__sop_instance_uid", "center__name", "center__slug", "last_error"]
    list_select_related = ["instance", "center"]
    date_hierarchy = "created_at"
    actions = ["retry"]

    @admin.action(description="Retry the selected failed deliveries (queue them again)")
    def retry(self, request, queryset):
        retried = deliveries_retry(deliveries=queryset, user=request.user)
        skipped = queryset.count() - retried
        self.message_user(
            request,
            f"{retried} failed delivery(ies) queued again."
            + (f" {skipped} selected were not failed and were left as they are." if skipped else ""),
        )

    @admin.display(description="matched pattern(s)")
    def why(self, delivery):
        return ", ".join(
            RoutingDecision.objects.filter(instance_id=delivery.instance_id, center_id=delivery.center_id)
            .order_by("pattern")
            .values_list("pattern", flat=True)
        )


@admin.register(RoutingDecision)
class RoutingDecisionAdmin(ReadOnlyAdmin):
    list_display = ["instance", "center", "pattern", "routing_key", "decided_at"]
    list_filter = ["center", "pattern"]
    search_fields = ["instance__sop_instance_uid", "pattern", "routing_key", "center__name"]
    list_select_related = ["instance", "center"]


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    list_display = [
        "task_name",
        "args",
        "exception_class",
        "short_message",
        "failures",
        "first_failed_at",
        "last_failed_at",
        "status",
        "retried_at",
    ]
    list_filter = ["status", "task_name", "exception_class"]
    search_fields = ["task_name", "exception_class", "message", "task_id"]
    date_hierarchy = "last_failed_at"
    actions = ["retry"]
    readonly_fields = [
        "task_name",
        "task_id",
        "args",
        "kwargs",
        "retryable",
        "exception_class",
        "message",
        "traceback",
        "failures",
        "first_failed_at",
        "last_failed_at",
        "status",
        "retried_at",
    ]

    @admin.display(description="message")
    def short_message(self, letter):
        return letter.message[:120]

    @admin.action(description="Retry the selected tasks (queue them again)")
    def retry(self, request, queryset):
        queued, skipped = dead_letters_retry(dead_letters=queryset, user=request.user)
        self.message_user(
            request,
            f"{queued} task(s) queued again."
            + (f" {skipped} could not be: already retried, arguments left out, or an unknown task." if skipped else ""),
        )


@admin.register(StudyWebhook)
class StudyWebhookAdmin(ReadOnlyAdmin):
    list_display = [
        "created_at",
        "center",
        "study",
        "instances",
        "status",
        "attempts",
        "next_attempt_at",
        "last_error",
        "sent_at",
    ]
    list_filter = ["status", "center"]
    search_fields = ["center__slug", "study__study_instance_uid"]
    actions = ["retry"]

    @admin.action(description="Retry the selected failed webhooks")
    def retry(self, request, queryset):
        retried = study_webhooks_retry(webhooks=queryset, user=request.user)
        self.message_user(request, f"{retried} webhook(s) will be sent again; {queryset.count() - retried} skipped.")
