"""Writes for centers, their keys and the audit log."""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from centers.models import AgentHeartbeat, ApiKey, AuditEvent, Center, City, Region
from routing import notify

KEY_PREFIX = "dx_"
# last_used_at is for humans ("is this key still in use?"); a write per
# request would cost more than it tells.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def key_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    secret: str


def audit_record(
    *,
    action: str,
    center: Center | None = None,
    user: AbstractBaseUser | None = None,
    api_key: ApiKey | None = None,
    obj: Any = None,
    object_type: str = "",
    object_id: str = "",
    address: str | None = None,
    detail: dict | None = None,
) -> AuditEvent:
    if obj is not None:
        object_type = object_type or obj._meta.model_name
        object_id = object_id or str(obj.pk)
    return AuditEvent.objects.create(
        action=action,
        center=center,
        user=_authenticated(user),
        api_key=api_key,
        object_type=object_type,
        object_id=object_id,
        address=address or None,
        detail=detail or {},
    )


def _authenticated(user: AbstractBaseUser | None) -> AbstractBaseUser | None:
    return user if user is not None and user.is_authenticated else None


def audit_events_record(events: list[dict], *, address: str | None = None) -> list[AuditEvent]:
    """Many audit rows in one INSERT; each dict holds audit_record's keyword arguments but obj."""
    return AuditEvent.objects.bulk_create(
        [
            AuditEvent(
                action=event["action"],
                center=event.get("center"),
                user=_authenticated(event.get("user")),
                api_key=event.get("api_key"),
                object_type=event.get("object_type", ""),
                object_id=event.get("object_id", ""),
                address=address or None,
                detail=event.get("detail") or {},
            )
            for event in events
        ]
    )


@transaction.atomic
def apikey_issue(*, center: Center, label: str = "", created_by: AbstractBaseUser | None = None) -> IssuedKey:
    """Create a key; its secret exists only in the return value."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    api_key = ApiKey.objects.create(
        center=center,
        label=label,
        prefix=secret[:10],
        digest=key_digest(secret),
        created_by=created_by if created_by is not None and created_by.is_authenticated else None,
    )
    audit_record(action="apikey.issue", center=center, user=created_by, obj=api_key, detail={"label": label})
    return IssuedKey(api_key=api_key, secret=secret)


@transaction.atomic
def apikey_revoke(*, api_key: ApiKey, revoked_by: AbstractBaseUser | None = None) -> bool:
    revoked = ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    if revoked:
        audit_record(action="apikey.revoke", center=api_key.center, user=revoked_by, obj=api_key)
        notify.center_access_changed([api_key.center_id])
    return bool(revoked)


def apikey_touch(*, api_key: ApiKey) -> None:
    now = timezone.now()
    if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now


class NetworkFileError(ValueError):
    pass


@transaction.atomic
def network_load(*, data: dict) -> dict[str, int]:
    """Create or update regions, cities, centers and subscriptions from a network file.

    Idempotent: loading the same file twice leaves the same state. Subscriptions
    of a listed center that the file no longer lists are deactivated, not deleted,
    so their routing history stays explainable.
    """
    from routing.patterns import InvalidPattern
    from routing.services import subscriptions_sync

    if not isinstance(data, dict):
        raise NetworkFileError("The network file must be a mapping with 'regions' and 'centers'.")
    counts = {"regions": 0, "cities": 0, "centers": 0, "subscriptions": 0}
    for region_data in data.get("regions") or []:
        region, _ = Region.objects.update_or_create(
            slug=_required(region_data, "slug", "region"),
            defaults={"name": region_data.get("name") or region_data["slug"]},
        )
        region.full_clean()
        counts["regions"] += 1
        for city_data in region_data.get("cities") or []:
            city, _ = City.objects.update_or_create(
                region=region,
                slug=_required(city_data, "slug", "city"),
                defaults={"name": city_data.get("name") or city_data["slug"]},
            )
            city.full_clean()
            counts["cities"] += 1
    for center_data in data.get("centers") or []:
        slug = _required(center_data, "slug", "center")
        city_ref = _required(center_data, "city", f"center {slug}")
        region_slug, _, city_slug = str(city_ref).partition("/")
        city = City.objects.filter(region__slug=region_slug, slug=city_slug).first()
        if city is None:
            raise NetworkFileError(f"Center {slug}: city {city_ref!r} is not defined (write it as region/city).")
        center, _ = Center.objects.update_or_create(
            slug=slug,
            defaults={
                "name": center_data.get("name") or slug,
                "city": city,
                "may_publish": bool(center_data.get("publish", False)),
                "may_subscribe": bool(center_data.get("subscribe", False)),
                "is_active": bool(center_data.get("active", True)),
            },
        )
        center.full_clean()
        counts["centers"] += 1
        patterns = center_data.get("subscriptions") or []
        if not isinstance(patterns, list):
            raise NetworkFileError(f"Center {slug}: subscriptions must be a list of patterns or option mappings.")
        try:
            # A scalar is a pattern (YAML reads `ct` as text, `1` as a number); anything else goes to the
            # parser as it is, which names it, instead of turning a list or null into a pattern by accident.
            specs = [str(p) if isinstance(p, str | int | float) and not isinstance(p, bool) else p for p in patterns]
            counts["subscriptions"] += subscriptions_sync(center=center, patterns=specs)
        except InvalidPattern as exc:
            raise NetworkFileError(f"Center {slug}: {exc}") from None
    return counts


def _required(mapping: Any, field: str, what: str) -> str:
    if not isinstance(mapping, dict) or not mapping.get(field):
        raise NetworkFileError(f"Every {what} needs a '{field}'.")
    return str(mapping[field])


def agent_heartbeat_record(
    *,
    api_key: ApiKey,
    hostname: str,
    version: str,
    roles: list[str],
    interval: int,
    spool: dict[str, int],
    outbox: dict[str, int],
    address: str | None,
    last_failure_at: datetime | None = None,
) -> AgentHeartbeat:
    """Note that one of the key's center's agents is alive; one row per center and host, updated in place."""
    # Not audited: it carries no patient data, and a row a minute per agent would bury the log.
    heartbeat, _ = AgentHeartbeat.objects.update_or_create(
        center=api_key.center,
        hostname=hostname,
        defaults={
            "version": version,
            "roles": roles,
            "interval": interval,
            "spool_count": spool.get("count", 0),
            "spool_bytes": spool.get("bytes", 0),
            "spool_failed": spool.get("failed", 0),
            "spool_retrying": spool.get("retrying", 0),
            "outbox_pending": outbox.get("pending", 0),
            "outbox_failed": outbox.get("failed", 0),
            "outbox_retrying": outbox.get("retrying", 0),
            "last_failure_at": last_failure_at,
            "api_key": api_key,
            "address": address,
            "last_seen_at": timezone.now(),
        },
    )
    return heartbeat


def webhook_secret_renew(*, centers, user: AbstractBaseUser | None = None) -> int:
    """A new salt, hence a new webhook secret, for each center; audited without the secret."""
    with transaction.atomic():
        renewed = list(centers.select_for_update())
        for center in renewed:
            Center.objects.filter(pk=center.pk).update(webhook_salt=secrets.token_hex(16))
            audit_record(action="center.webhook_secret_renew", center=center, user=user, obj=center)
    return len(renewed)
