"""A RabbitMQ node dying in the middle of a fan-out: quorum queues on a three-node cluster lose
nothing and duplicate nothing, per center.

The cluster is this test's own (tests/integration/rabbit_cluster.py); the machine's RabbitMQ is
not used. The portal and the worker are given the three nodes as a failover list and connect to
the first; that node, which also leads the task queue, is killed (SIGKILL, no clean hand-over)
once part of the instances are uploaded and routed. The periodic sweep is switched off, so every
instance must be routed by its own task message, through the broker that lost a node.
"""

import tempfile
import threading
import uuid
from pathlib import Path

import httpx
import pytest

from tests.dicomfiles import dicom_bytes
from tests.integration.conftest import TEST_DATABASE_URL, _create_database, _drop_database
from tests.integration.rabbit_cluster import RABBIT_BIN, RabbitCluster
from tests.integration.stack import Stack, base_env, wait_for

pytestmark = pytest.mark.integration

INSTANCES = 1000
CENTERS = 5
UPLOAD_THREADS = 4


@pytest.fixture(scope="module")
def cluster():
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        pytest.fail(f"RabbitMQ's server is needed in {RABBIT_BIN} (apt-get install rabbitmq-server)")
    # Not under pytest's tmp_path: Erlang node data paths are best kept short.
    running = RabbitCluster(Path(tempfile.mkdtemp(prefix="dx-rabbit-")))
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def cluster_stack(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack-rabbit-cluster")
    database = _create_database()
    base, _, _ = TEST_DATABASE_URL.rpartition("/")
    env = base_env(tmp)
    env.update(
        {
            "DATABASE_URL": f"{base}/{database}",
            "CELERY_BROKER_URL": cluster.url,
            "CELERY_QUEUE_TYPE": "quorum",
            "CELERY_QUEUE": f"dx-it-{uuid.uuid4().hex[:8]}",
            # No sweep: an instance whose task message the broker lost would stay unrouted.
            "SWEEP_INTERVAL_SECONDS": "3600",
        }
    )
    running = Stack(tmp=tmp, env=env, with_worker=True)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        _drop_database(database)


class Uploads:
    """The publishing center's uploads from several threads; a failed request is sent again, as the agent does."""

    def __init__(self, stack: Stack, key: str, count: int) -> None:
        self.stack, self.key = stack, key
        self.pending = [f"2.25.{uuid.uuid4().int}" for _ in range(count)]
        self.sop_uids = list(self.pending)
        self.lock = threading.Lock()
        self.stored = 0
        self.resent: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(UPLOAD_THREADS)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.stop.set()
        for thread in self.threads:
            thread.join(300)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/dicom"}
        with httpx.Client(base_url=self.stack.url, timeout=60) as client:
            while not self.stop.is_set():
                with self.lock:
                    if not self.pending:
                        return
                    sop_uid = self.pending.pop()
                body = dicom_bytes("CT", sop_uid=sop_uid, patient_id=f"PAT-{sop_uid[-4:]}")
                while not self.stop.is_set():
                    try:
                        response = client.post("/api/v1/instances", content=body, headers=headers)
                    except httpx.HTTPError as exc:
                        self.resent.append(repr(exc))
                        continue
                    if response.status_code in (200, 201):
                        break
                    self.resent.append(f"{response.status_code} {response.text[:200]}")
                with self.lock:
                    self.stored += 1

    def stored_count(self) -> int:
        with self.lock:
            return self.stored


def _connections_on(cluster: RabbitCluster, node_name: str) -> int:
    """Client connections to the node, from a connection's Erlang pid, which names its node."""
    survivor = next(n for n in cluster.nodes if n.name != node_name)
    pids = survivor.ctl("list_connections", "pid", "--no-table-headers", "--quiet").stdout.split()
    return sum(1 for pid in pids if f"<{node_name}." in pid)


def test_killing_a_rabbitmq_node_mid_fan_out_loses_and_duplicates_nothing_per_center(cluster, cluster_stack):
    try:
        _fan_out_across_a_node_loss(cluster, cluster_stack)
    except BaseException:
        # conftest shows the logs of its own stacks only.
        print(cluster_stack.logs())
        print(cluster.logs())
        raise


def _fan_out_across_a_node_loss(cluster: RabbitCluster, stack: Stack) -> None:
    s = uuid.uuid4().hex[:6]
    subscribers = [f"sub{i}-{s}" for i in range(CENTERS)]
    stack.load_network(
        f"""
regions:
  - {{slug: fars-{s}, name: Fars {s}, cities: [{{slug: shiraz, name: Shiraz}}]}}
centers:
  - {{slug: pub-{s}, name: Shiraz Imaging {s}, city: fars-{s}/shiraz, publish: true, subscribe: false}}
"""
        + "".join(
            f"  - {{slug: {slug}, name: Subscriber {slug}, city: fars-{s}/shiraz, publish: false, subscribe: true,"
            f' subscriptions: ["fars-{s}.#"]}}\n'
            for slug in subscribers
        )
    )
    key = stack.issue_key(f"pub-{s}")
    first = cluster.nodes[0]
    queue = stack.env["CELERY_QUEUE"]

    def routed() -> int:
        return stack.sql("SELECT count(*) FROM routing_instance WHERE routed_at IS NOT NULL")[0][0]

    # The queue holds a backlog when its leader dies: the worker is away for the first uploads.
    [worker] = [p for p in stack.processes if p.name == "worker"]
    worker.stop()
    with Uploads(stack, key, INSTANCES) as uploads:
        wait_for(lambda: uploads.stored_count() >= INSTANCES * 2 // 5, timeout=180, what="a backlog of uploads")
        stack.start_worker()
        wait_for(lambda: routed() >= INSTANCES // 10, timeout=180, interval=0.5, what="the fan-out to be under way")
        # The portal and the worker were given dx1 first: it is their node, and the queue's leader.
        assert _connections_on(cluster, first.name) > 0, "no client was connected to the node about to die"
        queues = {
            name: (kind, int(messages))
            for name, kind, messages in (
                line.split("\t")
                for line in first.ctl(
                    "list_queues", "name", "type", "messages", "--no-table-headers", "--quiet"
                ).stdout.splitlines()
            )
        }
        kind, backlog = queues[queue]
        assert kind == "quorum", queues
        first.kill()
        at_kill = routed()
        print(
            f"killed {first.name} with {uploads.stored_count()} uploaded, {at_kill} routed"
            f" and {backlog} task messages queued, of {INSTANCES}"
        )
        assert backlog > 0 and at_kill < INSTANCES, "the fan-out was over before the node died"
    assert uploads.stored_count() == INSTANCES
    survivors = cluster.running_nodes()
    assert first.name not in survivors and len(survivors) == 2, survivors

    wait_for(lambda: routed() == INSTANCES, timeout=180, interval=1, what="every instance to be routed")
    sop_uids = set(uploads.sop_uids)
    rows = stack.sql("SELECT sop_instance_uid FROM routing_instance WHERE routed_at IS NOT NULL")
    assert {uid for (uid,) in rows} == sop_uids
    for center in subscribers:
        delivered = stack.sql(
            "SELECT i.sop_instance_uid FROM routing_delivery d JOIN routing_instance i ON i.id = d.instance_id"
            " JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s",
            center,
        )
        uids = [uid for (uid,) in delivered]
        lost = len(sop_uids - set(uids))
        duplicated = len(uids) - len(set(uids))
        print(f"{center}: expected={INSTANCES} delivered={len(uids)} lost={lost} duplicated={duplicated}")
        assert (lost, duplicated) == (0, 0), center
    assert stack.sql("SELECT task_name, exception_class, message FROM routing_deadletter") == []
    print(f"uploads sent again after an error: {len(uploads.resent)} {uploads.resent[:3]}")
