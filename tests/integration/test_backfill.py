"""Backfill on the real stack: a center that subscribes late receives the past through its own agent,
on PostgreSQL + RabbitMQ + a worker and on the embedded default (SQLite, tasks run in place)."""

import re
import threading
from datetime import UTC, datetime, timedelta

import pytest

from tests.dicomfiles import write_study
from tests.integration.stack import wait_for
from tests.integration.test_exchange import inbox_files, receive_all

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("stack", ["postgres", "sqlite"], indirect=True)]
# Yesterday: the portal's day (UTC) may already have turned.
SINCE = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()


def count(stack, query: str, *params) -> int:
    return stack.sql(query, *params)[0][0]


def deliveries_of(stack, slug: str, origin: str | None = None) -> int:
    query = "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s"
    if origin is None:
        return count(stack, query, slug)
    return count(stack, query + " AND d.origin = %s", slug, origin)


def published_and_routed(stack, network, expected: int) -> None:
    wait_for(
        lambda: (
            count(
                stack,
                "SELECT count(*) FROM routing_instance i JOIN centers_center c ON c.id = i.source_center_id "
                "WHERE c.slug = %s AND i.routed_at IS NOT NULL",
                f"own-{network.s}",
            )
            == expected
        ),
        what=f"the fan-out of {expected} instances",
    )


def join(stack, network, name: str, pattern: str) -> str:
    """A center that subscribes now: returns its agent key."""
    stack.load_network(
        f"""
centers:
  - {{slug: {name}-{network.s}, name: Late {name}, city: tehran-{network.s}/tehran, publish: false, subscribe: true,
     subscriptions: ["{pattern}"]}}
"""
    )
    return stack.issue_key(f"{name}-{network.s}")


def backfill(stack, *args: str) -> str:
    result = stack.manage("backfill", *args)
    return result.stdout.strip().splitlines()[-1]


def test_a_late_subscriber_gets_only_new_instances_until_a_backfill_brings_the_past(stack, network, tmp_path):
    study = write_study(tmp_path / "outbox", series={"CT": 3, "MR": 1})
    assert stack.agent(network.keys["own"], "send", str(tmp_path / "outbox")).returncode == 0
    published_and_routed(stack, network, 4)

    late = join(stack, network, "late", f"{network.region}.*.ct")
    later = write_study(tmp_path / "later", series={"CT": 1})
    assert stack.agent(network.keys["own"], "send", str(tmp_path / "later")).returncode == 0
    published_and_routed(stack, network, 5)
    inbox = tmp_path / "inbox"
    # Only what was published after it subscribed.
    assert set(receive_all(stack, late, inbox, 1)) == {f"{uid}.dcm" for uid in later.values()}
    assert deliveries_of(stack, f"late-{network.s}") == 1

    assert backfill(stack, f"late-{network.s}", "--since", SINCE) == f"Queued 3 deliveries for late-{network.s}."
    files = receive_all(stack, late, inbox, 4)
    cts = {path: uid for path, uid in study.items() if path.name.startswith("CT-")}
    assert set(files) == {f"{uid}.dcm" for uid in [*cts.values(), *later.values()]}
    for path, uid in cts.items():
        assert files[f"{uid}.dcm"] == path.read_bytes()

    # Twice: nothing new, nothing received twice.
    assert backfill(stack, f"late-{network.s}", "--since", SINCE) == f"Queued 0 deliveries for late-{network.s}."
    assert stack.agent(late, "receive", "--inbox", str(inbox), "--once").returncode == 0
    assert len(inbox_files(inbox)) == 4
    assert deliveries_of(stack, f"late-{network.s}", "backfill") == 3
    audits = stack.sql(
        "SELECT a.detail FROM centers_auditevent a JOIN centers_center c ON c.id = a.center_id "
        "WHERE a.action = 'delivery.backfill' AND c.slug = %s ORDER BY a.id",
        f"late-{network.s}",
    )
    assert [_detail(row[0])["queued"] for row in audits] == [3, 0]
    pending = count(
        stack,
        "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id "
        "WHERE c.slug = %s AND d.status != 'delivered'",
        f"late-{network.s}",
    )
    assert pending == 0


def test_a_backfill_in_small_batches_beside_live_uploads_gives_each_instance_once(stack, network, tmp_path):
    write_study(tmp_path / "before", series={"CT": 12})
    assert stack.agent(network.keys["own"], "send", "--parallel", "4", str(tmp_path / "before")).returncode == 0
    published_and_routed(stack, network, 12)
    late = join(stack, network, "busy", f"{network.region}.#")
    write_study(tmp_path / "live", series={"CT": 6}, patient_id="PAT-LIVE")
    printed = {}

    def run_backfill():
        printed["line"] = backfill(stack, f"busy-{network.s}", "--since", SINCE, "--batch", "2")

    worker = threading.Thread(target=run_backfill)
    worker.start()
    sent = stack.agent(network.keys["own"], "send", "--parallel", "3", str(tmp_path / "live"))
    worker.join(timeout=300)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    published_and_routed(stack, network, 18)

    queued = int(re.fullmatch(rf"Queued (\d+) deliveries for busy-{network.s}\.", printed["line"]).group(1))
    # Each live upload went one way or the other (live fan-out, or the backfill got to it first), never both.
    assert 12 <= queued <= 18 and deliveries_of(stack, f"busy-{network.s}", "backfill") == queued
    assert deliveries_of(stack, f"busy-{network.s}") == 18
    assert len(receive_all(stack, late, tmp_path / "inbox", 18)) == 18


def test_the_admins_backfill_task_runs_on_the_worker(stack, network, tmp_path):
    study = write_study(tmp_path / "outbox", series={"CT": 2, "MR": 2})
    assert stack.agent(network.keys["own"], "send", str(tmp_path / "outbox")).returncode == 0
    published_and_routed(stack, network, 4)
    late = join(stack, network, "admin", f"{network.region}.*.mr")
    [(subscription,)] = stack.sql(
        "SELECT s.id FROM routing_subscription s JOIN centers_center c ON c.id = s.center_id WHERE c.slug = %s",
        f"admin-{network.s}",
    )
    # What the admin action queues at commit: with a broker, a message the worker picks up.
    stack.manage(
        "shell",
        "-c",
        f"from routing.tasks import backfill_subscription; backfill_subscription.delay({subscription}, '{SINCE}')",
    )
    files = receive_all(stack, late, tmp_path / "inbox", 2)
    assert set(files) == {f"{uid}.dcm" for path, uid in study.items() if path.name.startswith("MR-")}
    assert deliveries_of(stack, f"admin-{network.s}", "backfill") == 2


def _detail(value) -> dict:
    import json

    return value if isinstance(value, dict) else json.loads(value)
