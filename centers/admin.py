from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.utils import timezone
from django.utils.timesince import timesince

from centers.models import AgentHeartbeat, ApiKey, AuditEvent, Center, City, Membership, Modality, Region
from centers.services import apikey_issue, apikey_revoke, webhook_secret_renew
from centers.webhooks import webhook_secret


class CityInline(admin.TabularInline):
    model = City
    extra = 0


@admin.register(Region)
class RegionAdmin(admin.ModelAdmin):
    list_display = ["name", "slug"]
    search_fields = ["name", "slug"]
    inlines = [CityInline]


@admin.register(City)
class CityAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "region"]
    list_filter = ["region"]
    search_fields = ["name", "slug", "region__name"]


@admin.register(Modality)
class ModalityAdmin(admin.ModelAdmin):
    list_display = ["code", "name"]
    search_fields = ["code", "name"]


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    can_delete = False
    fields = ["prefix", "label", "created_at", "last_used_at", "revoked_at"]
    readonly_fields = fields
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


def agent_state(heartbeat: AgentHeartbeat) -> str:
    """ "online, seen 20 seconds ago" / "offline, last seen 3 hours ago"."""
    now = timezone.now()
    word = "online" if heartbeat.is_online(now) else "offline"
    return f"{word}, last seen {timesince(heartbeat.last_seen_at, now)} ago"


def agent_failures(heartbeat: AgentHeartbeat) -> str:
    """ "2 files set aside (spool 1, outbox 1), last 3 hours ago; 1 retrying", or "none"."""
    parts = []
    if heartbeat.failed:
        parts.append(
            f"{heartbeat.failed} set aside (spool {heartbeat.spool_failed}, outbox {heartbeat.outbox_failed})"
            + (f", last {timesince(heartbeat.last_failure_at)} ago" if heartbeat.last_failure_at else "")
        )
    if heartbeat.retrying:
        parts.append(f"{heartbeat.retrying} retrying")
    return "; ".join(parts) or "none"


def _size(value: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


class AgentHeartbeatInline(admin.TabularInline):
    model = AgentHeartbeat
    extra = 0
    can_delete = False
    fields = ["hostname", "state", "version", "roles", "spool", "outbox", "failures", "address"]
    readonly_fields = fields
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False

    @admin.display(description="state")
    def state(self, heartbeat):
        return agent_state(heartbeat)

    @admin.display(description="spool")
    def spool(self, heartbeat):
        return f"{heartbeat.spool_count} waiting ({_size(heartbeat.spool_bytes)}), {heartbeat.spool_failed} set aside"

    @admin.display(description="outbox")
    def outbox(self, heartbeat):
        return f"{heartbeat.outbox_pending} waiting, {heartbeat.outbox_failed} set aside"

    @admin.display(description="files that failed")
    def failures(self, heartbeat):
        return agent_failures(heartbeat)


@admin.register(Center)
class CenterAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "city", "may_publish", "may_subscribe", "is_active", "agent"]
    list_filter = ["is_active", "may_publish", "may_subscribe", "city__region", "city"]
    search_fields = ["name", "slug", "city__name"]
    inlines = [MembershipInline, ApiKeyInline, AgentHeartbeatInline]
    readonly_fields = ["webhook_secret"]
    actions = ["new_webhook_secret"]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("agents")

    @admin.display(description="webhook secret")
    def webhook_secret(self, center):
        if center.pk is None:
            return "shown once the center is saved"
        # Derived, not stored: give it to the center's IT staff to verify the webhook's signature.
        return webhook_secret(center)

    @admin.action(description="Give the selected centers a new webhook secret")
    def new_webhook_secret(self, request, queryset):
        changed = webhook_secret_renew(centers=queryset, user=request.user)
        self.message_user(request, f"{changed} center(s) have a new webhook secret; the old one no longer verifies.")

    @admin.display(description="agent")
    def agent(self, center):
        agents = list(center.agents.all())
        if not agents:
            return "never seen"
        return "; ".join(
            f"{h.hostname} {h.version}: {agent_state(h)}" + (f", {h.failed} files set aside" if h.failed else "")
            for h in agents
        )

    def get_inlines(self, request, obj):
        from routing.admin import SubscriptionInline

        return [SubscriptionInline, *self.inlines]


@admin.register(AgentHeartbeat)
class AgentHeartbeatAdmin(admin.ModelAdmin):
    list_display = [
        "center",
        "hostname",
        "version",
        "state",
        "last_seen_at",
        "spool_count",
        "spool_bytes",
        "outbox_pending",
        "failures",
    ]
    list_filter = ["center", "version"]
    search_fields = ["center__name", "center__slug", "hostname"]
    readonly_fields = [f.name for f in AgentHeartbeat._meta.fields]

    @admin.display(description="state")
    def state(self, heartbeat):
        return agent_state(heartbeat)

    @admin.display(description="files that failed")
    def failures(self, heartbeat):
        return agent_failures(heartbeat)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "center", "label", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["center", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["prefix", "label", "center__name", "center__slug"]
    actions = ["revoke"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["center", "label"]
        return ["center", "label", "prefix", "created_at", "created_by", "last_used_at", "revoked_at"]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        return ["center", "prefix", "created_at", "created_by", "last_used_at", "revoked_at"]

    def save_model(self, request, obj, form, change):
        if change:
            obj.save(update_fields=["label"])
            return
        issued = apikey_issue(center=obj.center, label=obj.label, created_by=request.user)
        obj.pk = issued.api_key.pk
        messages.warning(
            request,
            f"New key for {obj.center}: {issued.secret} — copy it now; it is stored only as a digest and "
            "cannot be shown again.",
        )

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset):
        revoked = sum(apikey_revoke(api_key=key, revoked_by=request.user) for key in queryset)
        self.message_user(request, f"{revoked} key(s) revoked.")

    def has_delete_permission(self, request, obj=None):
        # Revoke, don't delete: the audit log refers to keys.
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ["at", "action", "center", "user", "api_key", "object_type", "object_id", "address"]
    list_filter = ["action", "center", "object_type"]
    search_fields = ["action", "object_id", "user__username", "center__name", "address"]
    date_hierarchy = "at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


User = get_user_model()
admin.site.unregister(User)


class UserMembershipInline(admin.StackedInline):
    model = Membership
    extra = 0
    max_num = 1


@admin.register(User)
class ExchangeUserAdmin(UserAdmin):
    inlines = [*UserAdmin.inlines, UserMembershipInline]
    list_display = [*UserAdmin.list_display, "center"]
    list_filter = [*UserAdmin.list_filter, "membership__center"]

    @admin.display(description="center")
    def center(self, user):
        membership = getattr(user, "membership", None)
        return membership.center if membership else "—"
