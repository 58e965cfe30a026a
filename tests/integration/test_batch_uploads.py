"""Batched uploads on the real stack: hundreds of files from real agents, each received exactly once.

Runs on PostgreSQL + RabbitMQ + a worker, on the embedded default (SQLite, fan-out in the
request) and with the files in S3: three agents send at once, in batches, and a real
`agent receive` then gets every file once, byte for byte, and nothing more.
"""

import hashlib
import threading

import pytest

from tests.dicomfiles import write_study
from tests.integration.stack import wait_for

pytestmark = pytest.mark.integration

AGENTS = 3
PER_AGENT = 80


def sha256s(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.dcm")}


def test_hundreds_of_files_sent_in_batches_by_three_agents_at_once_arrive_exactly_once(stack, network, tmp_path):
    sent = {}
    for n in range(AGENTS):
        study = write_study(tmp_path / f"outbox-{n}", series={"CT": PER_AGENT // 2, "MR": PER_AGENT // 2})
        sent.update({f"{uid}.dcm": hashlib.sha256(path.read_bytes()).hexdigest() for path, uid in study.items()})
    results = [None] * AGENTS

    def send(n: int) -> None:
        results[n] = stack.agent(
            network.keys["own"], "send", "--parallel", "4", str(tmp_path / f"outbox-{n}"), timeout=300
        )

    threads = [threading.Thread(target=send, args=(n,)) for n in range(AGENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{PER_AGENT} sent, 0 already present, 0 skipped, 0 failed" in result.stdout
        assert "database is locked" not in result.stdout + result.stderr
    assert "database is locked" not in stack.logs()

    # The partner subscribes to the whole region: it receives everything, once.
    inbox = tmp_path / "in"
    inbox.mkdir()

    def received_all():
        result = stack.agent(network.keys["partner"], "receive", "--inbox", str(inbox), "--once", "--limit", "100")
        assert result.returncode == 0, result.stdout + result.stderr
        return len(sha256s(inbox)) >= len(sent)

    wait_for(received_all, interval=0.5, what=f"{len(sent)} files in the partner's inbox")
    assert sha256s(inbox) == sent
    assert len(list(inbox.rglob("*.dcm"))) == len(sent)
    queued = stack.sql(
        "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id "
        "WHERE c.slug = %s AND d.status <> 'delivered'",
        f"partner-{network.s}",
    )
    assert queued == [(0,)]
    # Sent again, all of it is already there: nothing stored, nothing delivered twice.
    again = stack.agent(network.keys["own"], "send", "--parallel", "4", str(tmp_path / "outbox-0"))
    assert f"0 sent, {PER_AGENT} already present" in again.stdout
    rest = stack.agent(network.keys["partner"], "receive", "--inbox", str(inbox), "--once")
    assert rest.returncode == 0
    assert len(list(inbox.rglob("*.dcm"))) == len(sent)
    stored = stack.sql(
        "SELECT count(*) FROM routing_instance i JOIN centers_center c ON c.id = i.source_center_id WHERE c.slug = %s",
        f"own-{network.s}",
    )
    assert stored == [(len(sent),)]
