"""The fan-out: the routing decisions, deliveries and pending de-identified copies that routing writes.

fanouts_write writes a whole batch's in a fixed number of statements, however many instances and
subscribers: the rows are the same as routing each instance alone. fanout_write is its call for one
instance (a single upload's task). Both run in the caller's transaction, which claims the instances
and matches them (routing.patterns); the copies' tasks go out at its commit.
"""

from dataclasses import dataclass, field
from functools import partial

from django.db import connection, transaction
from django.utils import timezone

from routing import notify
from routing.models import DeidentifiedCopy, Delivery, Instance, Priority, RoutingDecision
from routing.patterns import Match, RecipientOptions


@dataclass(frozen=True)
class Fanout:
    """What one fan-out wrote: centers given a delivery of the instance itself, and copies to de-identify."""

    delivery_centers: list[int]
    copy_ids: list[int]


def fanout_write(
    *,
    instance: Instance,
    matches: list[Match],
    options: dict[int, RecipientOptions],
    priority: int,
    origin: str,
    mark_routed: bool,
) -> Fanout:
    """Write the decisions, deliveries and pending de-identified copies of one instance, in the caller's transaction.

    fanouts_write's rows for a group of this one instance, at this priority rather than the instance's own.
    """
    group = FanoutGroup(matches=matches, options=options, instances=[instance], priority=priority)
    return fanouts_write(groups=[group], origin=origin, mark_routed=mark_routed)[instance.pk]


def _queue_deidentify(copy_id: int, priority: int = Priority.ROUTINE) -> None:
    from routing.services import task_queue
    from routing.tasks import deidentify_copy

    deidentify_copy.apply_async((copy_id,), queue=task_queue(priority))


@dataclass
class FanoutGroup:
    """Instances routed alike (one routing key, one publisher): their matches, each center's options, and the
    priority of their deliveries and copies (None: each instance's own; a backfill asks for routine)."""

    matches: list[Match]
    options: dict[int, RecipientOptions]
    instances: list[Instance] = field(default_factory=list)
    priority: int | None = None

    def priority_of(self, instance: Instance) -> int:
        return instance.priority if self.priority is None else self.priority


def fanouts_write(*, groups: list[FanoutGroup], origin: str, mark_routed: bool) -> dict[int, Fanout]:
    """Write the decisions, deliveries and pending de-identified copies of every instance of the groups at
    once, in the caller's transaction; per instance pk, what it wrote.

    Each instance's deliveries and copies take its group's priority, or else its own. A center that
    already has an instance (a delivery, or a copy for it) gets nothing new of it, so a second fan-out
    or a backfill over live traffic queues nothing twice. The agents are told once per center at
    commit, and each new copy's task is queued then.
    """
    groups = [group for group in groups if group.instances]
    if not groups:
        return {}
    write = _fanouts_write_postgresql if connection.vendor == "postgresql" else _fanouts_write
    written = write(groups=groups, origin=origin, mark_routed=mark_routed)
    notify.deliveries_queued({c for fanout in written.values() for c in fanout.delivery_centers})
    priority = {instance.pk: group.priority_of(instance) for group in groups for instance in group.instances}
    for instance_id, fanout in written.items():
        for copy_id in fanout.copy_ids:
            transaction.on_commit(partial(_queue_deidentify, copy_id, priority[instance_id]), robust=True)
    return written


def _recipients(options: dict[int, RecipientOptions]) -> tuple[list[int], list[int], set[int]]:
    """The centers given a delivery, those given a copy to de-identify, and those that wait for whole studies."""
    plain = sorted(c for c, o in options.items() if o.deidentify == "none")
    deidentified = sorted(c for c, o in options.items() if o.deidentify != "none")
    whole = {c for c, o in options.items() if o.deliver == "study"}
    return plain, deidentified, whole


def _written(instance_ids: list[int]) -> dict[int, Fanout]:
    return {pk: Fanout(delivery_centers=[], copy_ids=[]) for pk in sorted(instance_ids)}


def _fanouts_write(*, groups: list[FanoutGroup], origin: str, mark_routed: bool) -> dict[int, Fanout]:
    """The fan-out through the ORM, each query over the whole batch (a bulk INSERT splits only past SQLite's
    variable limit)."""
    batch = [(instance, group) for group in groups for instance in group.instances]
    ids = [instance.pk for instance, _ in batch]
    RoutingDecision.objects.bulk_create(
        [
            RoutingDecision(
                instance=instance,
                center_id=m.center_id,
                subscription_id=m.subscription_id,
                pattern=m.pattern,
                routing_key=m.key,
            )
            for instance, group in batch
            for m in group.matches
        ],
        ignore_conflicts=True,
    )
    centers = {c for group in groups for c in group.options}
    served = set(
        Delivery.objects.filter(instance_id__in=ids, center_id__in=centers).values_list("instance_id", "center_id")
    )
    served |= set(
        DeidentifiedCopy.objects.filter(original_id__in=ids, center_id__in=centers).values_list(
            "original_id", "center_id"
        )
    )
    deliveries, copies = [], []
    for instance, group in batch:
        plain, deidentified, whole = _recipients(group.options)
        priority = group.priority_of(instance)
        deliveries += [
            Delivery(instance=instance, center_id=c, priority=priority, origin=origin, whole_study=c in whole)
            for c in plain
            if (instance.pk, c) not in served
        ]
        copies += [
            DeidentifiedCopy(original=instance, center_id=c, priority=priority, origin=origin, whole_study=c in whole)
            for c in deidentified
            if (instance.pk, c) not in served
        ]
    Delivery.objects.bulk_create(deliveries, ignore_conflicts=True)
    DeidentifiedCopy.objects.bulk_create(copies, ignore_conflicts=True)
    written = _written(ids)
    for delivery in deliveries:
        written[delivery.instance_id].delivery_centers.append(delivery.center_id)
    new_copies = {(copy.original_id, copy.center_id) for copy in copies}
    if new_copies:
        made = DeidentifiedCopy.objects.filter(
            original_id__in={original for original, _ in new_copies}, center_id__in={c for _, c in new_copies}
        ).values_list("original_id", "center_id", "pk")
        for original, center, pk in sorted(made, key=lambda row: row[2]):
            if (original, center) in new_copies:
                written[original].copy_ids.append(pk)
    if mark_routed:
        Instance.objects.filter(pk__in=ids).update(routed_at=timezone.now())
    return written


# The batch's instances, each with its group, and each group's matches and recipients, go in as
# parallel arrays joined on the group: a few rows per routing key, not one per instance x subscriber.
# Rows are inserted in instance order, then center order, as one instance after the other would be:
# the lease's order breaks ties by primary key.
_FANOUTS_SQL = """
WITH batch AS (
    SELECT * FROM unnest(%(instances)s::bigint[], %(instance_groups)s::integer[], %(priorities)s::smallint[])
        AS b(instance_id, grp, priority)
), matched AS (
    SELECT * FROM unnest(%(match_groups)s::integer[], %(match_centers)s::bigint[], %(subscriptions)s::bigint[],
                         %(patterns)s::text[], %(keys)s::text[])
        AS m(grp, center_id, subscription_id, pattern, routing_key)
), recipient AS (
    SELECT * FROM unnest(%(recipient_groups)s::integer[], %(recipient_centers)s::bigint[],
                         %(recipient_deidentify)s::boolean[], %(recipient_whole)s::boolean[])
        AS r(grp, center_id, deidentify, whole_study)
), decisions AS (
    INSERT INTO {decision} (instance_id, center_id, subscription_id, pattern, routing_key, decided_at)
    SELECT b.instance_id, m.center_id, m.subscription_id, m.pattern, m.routing_key, %(now)s
    FROM batch b JOIN matched m ON m.grp = b.grp
    ORDER BY b.instance_id, m.center_id, m.pattern
    ON CONFLICT DO NOTHING
), routed AS (
    UPDATE {instance} SET routed_at = %(now)s WHERE id = ANY(%(instances)s::bigint[]) AND %(mark_routed)s
), deliveries AS (
    INSERT INTO {delivery} (instance_id, center_id, status, created_at, attempts, last_error, priority, origin,
                            whole_study)
    SELECT b.instance_id, r.center_id, %(queued)s, %(now)s, 0, '', b.priority, %(origin)s, r.whole_study
    FROM batch b JOIN recipient r ON r.grp = b.grp AND NOT r.deidentify
    WHERE NOT EXISTS (SELECT 1 FROM {copy} x WHERE x.original_id = b.instance_id AND x.center_id = r.center_id)
    ORDER BY b.instance_id, r.center_id
    ON CONFLICT DO NOTHING
    RETURNING instance_id, center_id
), copies AS (
    INSERT INTO {copy} (original_id, center_id, status, priority, origin, whole_study, reason, created_at)
    SELECT b.instance_id, r.center_id, %(pending)s, b.priority, %(origin)s, r.whole_study, '', %(now)s
    FROM batch b JOIN recipient r ON r.grp = b.grp AND r.deidentify
    WHERE NOT EXISTS (SELECT 1 FROM {delivery} d WHERE d.instance_id = b.instance_id AND d.center_id = r.center_id)
    ORDER BY b.instance_id, r.center_id
    ON CONFLICT DO NOTHING
    RETURNING original_id, id
)
SELECT 'delivery', instance_id, center_id FROM deliveries UNION ALL SELECT 'copy', original_id, id FROM copies
"""


def _fanouts_write_postgresql(*, groups: list[FanoutGroup], origin: str, mark_routed: bool) -> dict[int, Fanout]:
    """The same rows as _fanouts_write in one statement, over the batch's instances x their recipients."""
    params = {
        "instances": [],
        "instance_groups": [],
        "priorities": [],
        "match_groups": [],
        "match_centers": [],
        "subscriptions": [],
        "patterns": [],
        "keys": [],
        "recipient_groups": [],
        "recipient_centers": [],
        "recipient_deidentify": [],
        "recipient_whole": [],
    }
    for index, group in enumerate(groups):
        for instance in group.instances:
            params["instances"].append(instance.pk)
            params["instance_groups"].append(index)
            params["priorities"].append(group.priority_of(instance))
        for m in group.matches:
            params["match_groups"].append(index)
            params["match_centers"].append(m.center_id)
            params["subscriptions"].append(m.subscription_id)
            params["patterns"].append(m.pattern)
            params["keys"].append(m.key)
        plain, deidentified, whole = _recipients(group.options)
        for c, deidentify in [(c, False) for c in plain] + [(c, True) for c in deidentified]:
            params["recipient_groups"].append(index)
            params["recipient_centers"].append(c)
            params["recipient_deidentify"].append(deidentify)
            params["recipient_whole"].append(c in whole)
    sql = _FANOUTS_SQL.format(
        decision=RoutingDecision._meta.db_table,
        instance=Instance._meta.db_table,
        delivery=Delivery._meta.db_table,
        copy=DeidentifiedCopy._meta.db_table,
    )
    with connection.cursor() as cursor:
        cursor.execute(
            sql,
            {
                **params,
                "now": timezone.now(),
                "mark_routed": mark_routed,
                "queued": Delivery.Status.QUEUED,
                "pending": DeidentifiedCopy.Status.PENDING,
                "origin": origin,
            },
        )
        rows = cursor.fetchall()
    written = _written(params["instances"])
    for kind, instance_id, value in sorted(rows):
        (written[instance_id].delivery_centers if kind == "delivery" else written[instance_id].copy_ids).append(value)
    return written
