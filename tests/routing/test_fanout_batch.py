"""A batch's fan-out in a fixed number of statements (routing.fanout.fanouts_write), writing exactly the
rows the subscriptions call for, as routing each of its instances alone does, on both of the fan-out's
write paths."""

from functools import partial

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from centers.models import Center
from routing import notify
from routing.batch import instances_route
from routing.models import DeidentifiedCopy, Delivery, Instance, Priority, RoutingDecision, Subscription
from routing.services import instance_route
from tests.dicomfiles import dicom_bytes
from tests.routing.test_ingest_batch import upload_batch

pytestmark = pytest.mark.django_db


@pytest.fixture(params=["one statement", "orm"])
def write_path(request, monkeypatch):
    """PostgreSQL writes the fan-out in one statement; other databases through the ORM. Run both here."""
    if request.param == "orm":
        monkeypatch.setattr(connection, "vendor", "sqlite")
    elif connection.vendor != "postgresql":
        pytest.skip("the one-statement fan-out is PostgreSQL's")
    return request.param


@pytest.fixture
def queued(monkeypatch):
    """The batches' route_instances messages, kept instead of run."""
    from routing import tasks

    sent = []
    monkeypatch.setattr(tasks.route_instances, "apply_async", lambda args, queue: sent.append(args[0]))
    return sent


@pytest.fixture
def notified(monkeypatch):
    """Every center list the fan-out tells the idle-poll caches about (then told, as always)."""
    calls = []
    told = notify.deliveries_queued

    def record(center_ids, **kwargs):
        calls.append(sorted(center_ids))
        told(center_ids, **kwargs)

    monkeypatch.setattr(notify, "deliveries_queued", record)
    return calls


@pytest.fixture
def subscribers(network, write_path):
    """Beside the partner (fars.#, plain) and the outsider (#.nm): every kind of recipient.

    The outsider de-identifies Fars MR; a center takes Fars CT as whole studies and the rest
    plainly; another de-identifies all of Fars as whole studies; and the publisher subscribes
    to everything, which never brings it its own uploads.
    """
    city = network["own"].city
    whole = Center.objects.create(slug="whole-studies", name="Whole Studies", city=city, may_subscribe=True)
    deid = Center.objects.create(slug="research", name="Research", city=city, may_subscribe=True)
    Subscription.objects.create(center=network["outsider"], pattern="fars.*.mr", deidentify="basic")
    Subscription.objects.create(center=whole, pattern="*.*.ct", deliver="study")
    Subscription.objects.create(center=whole, pattern="fars.#")
    Subscription.objects.create(center=deid, pattern="fars.#", deidentify="basic", deliver="study")
    Center.objects.filter(pk=network["own"].pk).update(may_subscribe=True)
    Subscription.objects.create(center=network["own"], pattern="#")
    return {**network, "whole": whole, "deid": deid}


# Per routing key of the subscribers' network, what each center gets (a delivery of the instance, or a
# copy to de-identify), whether it waits for the whole study, and the patterns that matched it.
EXPECTED = {
    "fars.shiraz.ct": {
        "partner": ("delivery", False, ["fars.#"]),
        "whole": ("delivery", True, ["*.*.ct", "fars.#"]),
        "deid": ("copy", True, ["fars.#"]),
    },
    "fars.shiraz.mr": {
        "partner": ("delivery", False, ["fars.#"]),
        "outsider": ("copy", False, ["fars.*.mr"]),
        "whole": ("delivery", False, ["fars.#"]),
        "deid": ("copy", True, ["fars.#"]),
    },
    "fars.shiraz.nm": {
        "partner": ("delivery", False, ["fars.#"]),
        "outsider": ("delivery", False, ["#.nm"]),
        "whole": ("delivery", False, ["fars.#"]),
        "deid": ("copy", True, ["fars.#"]),
    },
    "isfahan.isfahan.ct": {"whole": ("delivery", True, ["*.*.ct"]), "own": ("delivery", False, ["#"])},
    "isfahan.isfahan.mr": {"own": ("delivery", False, ["#"])},
    "isfahan.isfahan.nm": {"own": ("delivery", False, ["#"])},
}


def expected_rows(instance_ids: list[int], subscribers: dict, has: set[tuple[int, int]]) -> dict:
    """The rows of EXPECTED for these instances, live, each at its own priority; nothing new to a center
    that `has` the instance (instance, center) already."""
    rows = {"decisions": [], "deliveries": [], "copies": []}
    for pk, key, priority in Instance.objects.filter(pk__in=instance_ids).values_list("pk", "routing_key", "priority"):
        for name, (kind, whole, patterns) in EXPECTED[key].items():
            center = subscribers[name].pk
            rows["decisions"] += [(pk, center, pattern, key) for pattern in patterns]
            if (pk, center) in has:
                continue
            if kind == "delivery":
                rows["deliveries"].append((pk, center, "queued", priority, "live", whole, 0, ""))
            else:
                rows["copies"].append((pk, center, "pending", priority, "live", whole, ""))
    return {name: sorted(found) for name, found in rows.items()}


def mixed(count: int, first: int = 1) -> list[bytes]:
    """CT, MR and NM instances of one patient, in turn."""
    return [dicom_bytes(("CT", "MR", "NM")[n % 3], instance_number=n) for n in range(first, first + count)]


def routing_rows(instance_ids: list[int]) -> dict:
    """What routing wrote for these instances, without primary keys and times."""
    copies = DeidentifiedCopy.objects.filter(original_id__in=instance_ids)
    return {
        "decisions": sorted(
            RoutingDecision.objects.filter(instance_id__in=instance_ids).values_list(
                "instance_id", "center_id", "subscription_id", "pattern", "routing_key"
            )
        ),
        "deliveries": sorted(
            Delivery.objects.filter(instance_id__in=instance_ids).values_list(
                "instance_id", "center_id", "status", "priority", "origin", "whole_study", "attempts", "last_error"
            )
        ),
        "copies": sorted(
            copies.values_list("original_id", "center_id", "status", "priority", "origin", "whole_study", "reason")
        ),
        "routed": sorted(
            (pk, routed_at is not None)
            for pk, routed_at in Instance.objects.filter(pk__in=instance_ids).values_list("pk", "routed_at")
        ),
        "copy ids": {
            pk: (original, center) for pk, original, center in copies.values_list("pk", "original_id", "center_id")
        },
    }


def routed_and_undone(route, instance_ids, capture_on_commit, notified) -> tuple[dict, list]:
    """Route, note what was written, queued at commit and told to the agents, then roll it all back."""
    notified.clear()
    with transaction.atomic():
        with capture_on_commit() as callbacks:
            route()
        rows = routing_rows(instance_ids)
        transaction.set_rollback(True)
    copy_ids = rows.pop("copy ids")
    rows["copy tasks"] = sorted(
        (copy_ids[cb.args[0]], cb.args[1])
        for cb in callbacks
        if isinstance(cb, partial) and cb.func.__name__ == "_queue_deidentify"
    )
    rows["told"] = sorted({c for call in notified for c in call})
    calls = list(notified)
    notified.clear()
    return rows, calls


def test_a_batch_writes_exactly_what_routing_each_instance_alone_writes(
    agents, subscribers, queued, notified, django_capture_on_commit_callbacks
):
    upload_batch(agents["own"], mixed(6))
    upload_batch(agents["own"], mixed(3, first=20), query="?priority=stat")
    upload_batch(agents["outsider"], mixed(3, first=40))
    ids = sorted(pk for batch in queued for pk in batch)
    ct, mr = (
        Instance.objects.filter(pk__in=ids, routing_key=key).order_by("pk").first()
        for key in ("fars.shiraz.ct", "fars.shiraz.mr")
    )
    # Some centers have some instances already: from a backfill, or a copy made before.
    Delivery.objects.create(instance=ct, center=subscribers["partner"], origin=Delivery.Origin.BACKFILL)
    DeidentifiedCopy.objects.create(original=ct, center=subscribers["deid"])
    Delivery.objects.create(instance=mr, center=subscribers["outsider"])
    DeidentifiedCopy.objects.create(original=mr, center=subscribers["partner"])
    before = routing_rows(ids)
    has = {(ct.pk, subscribers["partner"].pk), (ct.pk, subscribers["deid"].pk)}
    has |= {(mr.pk, subscribers["outsider"].pk), (mr.pk, subscribers["partner"].pk)}
    expected = expected_rows(ids, subscribers, has)

    batch, batch_calls = routed_and_undone(
        lambda: instances_route(instance_ids=ids), ids, django_capture_on_commit_callbacks, notified
    )
    assert routing_rows(ids) == before, "rolled back"
    alone, _ = routed_and_undone(
        lambda: [instance_route(instance_id=pk) for pk in ids], ids, django_capture_on_commit_callbacks, notified
    )

    assert batch == alone
    assert [(i, c, p, k) for i, c, _, p, k in batch["decisions"]] == expected["decisions"]
    assert [row for row in batch["deliveries"] if row[:2] not in has] == expected["deliveries"]
    assert [row for row in batch["copies"] if row[:2] not in has] == expected["copies"]
    assert {routed for _, routed in batch["routed"]} == {True}
    assert batch["copy tasks"] == sorted((row[:2], row[3]) for row in expected["copies"]), "one per new copy"
    assert len(batch_calls) == 1 and batch_calls[0] == batch["told"], "each center told once"
    by_center = {(instance, center) for instance, center, *_ in batch["deliveries"]}
    assert (ct.pk, subscribers["partner"].pk) in by_center
    assert not {(pk, subscribers["own"].pk) for pk in ids[:9]} & by_center, "never its own uploads"
    assert any(c == subscribers["own"].pk for _, c, *_ in batch["deliveries"]), "the outsider's NM reaches own"
    assert Delivery.objects.get(instance=ct, center=subscribers["partner"]).origin == Delivery.Origin.BACKFILL
    assert not DeidentifiedCopy.objects.filter(original=mr, center=subscribers["outsider"]).exists()
    assert not Delivery.objects.filter(instance=mr, center=subscribers["partner"]).exists()
    stat = set(Instance.objects.filter(pk__in=ids, priority=Priority.STAT).values_list("pk", flat=True))
    assert len(stat) == 3
    assert {p for i, _, _, p, *_ in batch["deliveries"] if i in stat} == {Priority.STAT}
    assert {p for i, _, _, p, *_ in batch["copies"] if i in stat} == {Priority.STAT}
    assert {w for _, c, *_, w, _, _ in batch["deliveries"] if c == subscribers["whole"].pk} == {True, False}


def test_a_batch_is_routed_in_as_many_queries_at_50_instances_as_at_2(agents, subscribers, queued):
    counts = []
    for size, first in ((2, 1), (50, 100)):
        upload_batch(agents["own"], mixed(size, first=first))
        with CaptureQueriesContext(connection) as captured:
            assert instances_route(instance_ids=queued[-1]) == size
        counts.append(len(captured))
    assert counts[0] == counts[1]
    assert Delivery.objects.count() + DeidentifiedCopy.objects.count() > 52 * 3


def test_routing_a_batch_again_writes_nothing(agents, subscribers, queued, notified):
    upload_batch(agents["own"], mixed(6))
    [ids] = queued
    assert instances_route(instance_ids=ids) == 6
    rows = routing_rows(ids)
    notified.clear()
    assert instances_route(instance_ids=ids) == 0
    assert routing_rows(ids) == rows
    assert notified == []


def test_a_second_fan_out_of_the_same_instances_writes_nothing_new(agents, subscribers, queued):
    from routing.fanout import FanoutGroup, fanouts_write
    from routing.patterns import recipient_options, route
    from routing.services import subscriptions_active

    upload_batch(agents["own"], mixed(3))
    [ids] = queued
    assert instances_route(instance_ids=ids) == 3
    rows = routing_rows(ids)
    groups = []
    for instance in Instance.objects.filter(pk__in=ids):
        matches = route(instance.routing_key, subscriptions_active(), exclude_center_id=instance.source_center_id)
        groups.append(FanoutGroup(matches=matches, options=recipient_options(matches), instances=[instance]))
    with transaction.atomic():
        written = fanouts_write(groups=groups, origin=Delivery.Origin.BACKFILL, mark_routed=False)
    assert sorted(written) == sorted(ids)
    assert all(f.delivery_centers == [] and f.copy_ids == [] for f in written.values())
    assert routing_rows(ids) == rows


def test_a_center_that_has_an_instance_gets_nothing_new_of_it_and_the_rest_of_the_batch(agents, subscribers, queued):
    upload_batch(agents["own"], mixed(3))
    [ids] = queued
    ct = Instance.objects.get(pk__in=ids, routing_key="fars.shiraz.ct")
    Delivery.objects.create(instance=ct, center=subscribers["partner"], origin=Delivery.Origin.BACKFILL)
    DeidentifiedCopy.objects.create(original=ct, center=subscribers["deid"], status=DeidentifiedCopy.Status.MADE)
    instances_route(instance_ids=ids)
    assert Delivery.objects.filter(center=subscribers["partner"]).count() == 3
    assert Delivery.objects.get(instance=ct, center=subscribers["partner"]).origin == Delivery.Origin.BACKFILL
    assert not Delivery.objects.filter(instance=ct, center=subscribers["deid"]).exists()
    assert DeidentifiedCopy.objects.get(original=ct, center=subscribers["deid"]).status == "made"
    assert DeidentifiedCopy.objects.filter(center=subscribers["deid"], status="pending").count() == 2


def test_a_group_given_a_priority_writes_its_instances_deliveries_and_copies_at_it(
    agents, subscribers, queued, django_capture_on_commit_callbacks
):
    from routing.fanout import FanoutGroup, fanouts_write
    from routing.patterns import recipient_options, route
    from routing.services import subscriptions_active

    upload_batch(agents["own"], mixed(6), query="?priority=stat")
    [ids] = queued
    groups = []
    for n, instance in enumerate(Instance.objects.filter(pk__in=ids).order_by("pk")):
        matches = route(instance.routing_key, subscriptions_active(), exclude_center_id=instance.source_center_id)
        priority = Priority.ROUTINE if n % 2 else None  # None: the instance's own, stat
        groups.append(
            FanoutGroup(matches=matches, options=recipient_options(matches), instances=[instance], priority=priority)
        )
    routine = {group.instances[0].pk for group in groups if group.priority is not None}
    with django_capture_on_commit_callbacks() as callbacks:
        fanouts_write(groups=groups, origin=Delivery.Origin.BACKFILL, mark_routed=False)

    rows = routing_rows(ids)
    want = {(True, Priority.ROUTINE), (False, Priority.STAT)}
    assert {(i in routine, p) for i, _, _, p, *_ in rows["deliveries"]} == want
    assert {(i in routine, p) for i, _, _, p, *_ in rows["copies"]} == want
    tasks = [cb.args for cb in callbacks if isinstance(cb, partial) and cb.func.__name__ == "_queue_deidentify"]
    assert len(tasks) == len(rows["copies"])
    assert {(rows["copy ids"][copy_id][0] in routine, p) for copy_id, p in tasks} == want
