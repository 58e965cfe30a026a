"""Outages: the broker down during an upload, the portal restarting under a receiving agent."""

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from tests.dicomfiles import dicom_bytes, write_study
from tests.integration.conftest import Network
from tests.integration.stack import BIN, Stack, base_env, free_port, wait_for

pytestmark = pytest.mark.integration


def test_an_upload_accepted_while_the_broker_is_down_is_delivered_once_it_is_back(pg_network, postgres_stack, tmp_path):
    stack = postgres_stack
    # A web process whose broker is unreachable: RabbitMQ "down" for it alone,
    # so the shared server on this machine keeps running for everyone else.
    port = free_port()
    cut_off = stack.start_server(
        port=port, env={**stack.env, "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"}, name="server-no-broker"
    )
    (tmp_path / "ct.dcm").write_bytes(dicom_bytes("CT"))
    sent = stack.agent(pg_network.keys["own"], "send", str(tmp_path / "ct.dcm"), server=f"http://127.0.0.1:{port}")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    cut_off.stop()

    # The worker's beat runs the sweep, which finds the unrouted instance.
    inbox = tmp_path / "in"
    inbox.mkdir()

    def arrived():
        assert stack.agent(pg_network.keys["partner"], "receive", "--inbox", str(inbox), "--once").returncode == 0
        return list(inbox.rglob("*.dcm"))

    [path] = wait_for(arrived, interval=1, what="the swept instance to arrive")
    assert path.read_bytes() == (tmp_path / "ct.dcm").read_bytes()


def test_a_receiving_agent_rides_out_a_portal_restart(pg_network, postgres_stack, tmp_path):
    stack = postgres_stack
    inbox = tmp_path / "in"
    inbox.mkdir()
    receiver = stack.agent_process(pg_network.keys["partner"], "receive", "--inbox", str(inbox), "--wait", "2")
    try:
        stack.server.stop(signal.SIGKILL)
        study = write_study(tmp_path / "outbox", series={"MR": 2})
        stack.server = stack.start_server()
        assert stack.agent(pg_network.keys["own"], "send", str(tmp_path / "outbox")).returncode == 0
        wait_for(lambda: len(list(inbox.rglob("*.dcm"))) == 2, timeout=120, what="2 files after the restart")
        assert {p.name for p in inbox.rglob("*.dcm")} == {f"{uid}.dcm" for uid in study.values()}
        assert receiver.popen.poll() is None, "the agent gave up"
    finally:
        receiver.stop()
    assert not list(inbox.rglob("*.part")), "a partial file was left behind"


@pytest.fixture(scope="module")
def lone_worker_stack(tmp_path_factory):
    """A portal whose only worker runs one task at a time and no beat, so a test knows
    which process runs a task; tasks are retried twice, at once."""
    from tests.integration.conftest import (
        TEST_BROKER_URL,
        TEST_DATABASE_URL,
        _check_broker,
        _create_database,
        _delete_queue,
        _drop_database,
    )

    tmp = tmp_path_factory.mktemp("stack-lone-worker")
    _check_broker()
    database, queue = _create_database(), f"dx-it-{uuid.uuid4().hex[:8]}"
    env = base_env(tmp)
    env.update(
        {
            "DATABASE_URL": f"{TEST_DATABASE_URL.rpartition('/')[0]}/{database}",
            "CELERY_BROKER_URL": TEST_BROKER_URL,
            "CELERY_QUEUE": queue,
            "TASK_MAX_RETRIES": "2",
            "TASK_RETRY_DELAY_SECONDS": "0",
        }
    )
    stack = Stack(tmp=tmp, env=env, with_worker=False)
    try:
        stack.manage("migrate", "--no-input", "-v0")
        stack.server = stack.start_server()
        stack.worker = stack.spawn(
            "worker",
            [
                str(BIN / "celery"),
                "-A",
                "portal",
                "worker",
                "--loglevel=INFO",
                "--concurrency=1",
                "--without-gossip",
                "--without-mingle",
                "-n",
                f"dx-lone-{uuid.uuid4().hex[:8]}@%h",
            ],
        )
        yield stack
    finally:
        stack.stop()
        _drop_database(database)
        _delete_queue(queue)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def test_a_task_that_kills_its_worker_is_dead_lettered_not_redelivered_forever(lone_worker_stack, tmp_path):
    """A poison message: whatever runs it dies (here SIGKILL, as the kernel's OOM killer
    would). Acked late and rejected on worker loss, it would be redelivered forever;
    each loss is a retry instead, and after the last one it is dead-lettered."""
    import psycopg

    stack = lone_worker_stack
    network = Network(stack)
    database = stack.env["DATABASE_URL"]
    (tmp_path / "poison.dcm").write_bytes(dicom_bytes("CT"))
    (tmp_path / "good.dcm").write_bytes(dicom_bytes("MR"))
    holder = psycopg.connect(database)
    try:
        # The fan-out reads the subscriptions: held here, it waits until its worker is killed.
        holder.execute("LOCK TABLE routing_subscription IN ACCESS EXCLUSIVE MODE")
        sent = stack.agent(network.keys["own"], "send", str(tmp_path / "poison.dcm"))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        [(poison,)] = stack.sql("SELECT id FROM routing_instance")
        seen, kills = set(), 0

        def dead_letter():
            return stack.sql("SELECT task_name, args, exception_class, failures FROM routing_deadletter")

        while not dead_letter():
            waiting = {
                pid
                for (pid,) in stack.sql(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            }
            if waiting - seen:
                seen |= waiting
                for child in _children(stack.worker.popen.pid):
                    os.kill(child, signal.SIGKILL)
                kills += 1
            assert kills <= 5, "the message keeps coming back"
            assert stack.worker.popen.poll() is None, "the worker itself died"
            time.sleep(0.2)
    finally:
        holder.close()
    [(task, args, exception, failures)] = dead_letter()
    assert (task, args, failures) == ("routing.tasks.route_instance", [poison], 1)
    assert exception.endswith("WorkerLostError")
    assert kills == 3, "the first run and its two retries"

    # The worker goes on, and the poison message, acknowledged, never comes back.
    sent = stack.agent(network.keys["own"], "send", str(tmp_path / "good.dcm"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(
        lambda: stack.sql("SELECT count(*) FROM routing_instance WHERE routed_at IS NOT NULL") == [(1,)],
        timeout=60,
        what="the good instance to be routed",
    )
    assert stack.sql("SELECT routed_at FROM routing_instance WHERE id = %s", poison) == [(None,)]


def test_an_upload_killed_between_the_storage_write_and_the_commit_leaves_a_file_the_sweep_removes(
    lone_worker_stack, tmp_path
):
    import psycopg

    stack = lone_worker_stack
    network = Network(stack)
    storage = Path(stack.env["DICOM_STORAGE_DIR"])
    before = set(storage.rglob("*.dcm"))
    (tmp_path / "ct.dcm").write_bytes(dicom_bytes("CT"))
    sweep = "from routing.tasks import sweep_orphan_files; print(sweep_orphan_files())"
    holder = psycopg.connect(stack.env["DATABASE_URL"])
    try:
        # The upload's transaction writes its audit row last: held here, it waits with the
        # file stored and its row not committed, as long as the test likes.
        holder.execute("LOCK TABLE centers_auditevent IN ACCESS EXCLUSIVE MODE")
        sender = stack.agent_process(network.keys["own"], "send", str(tmp_path / "ct.dcm"))
        [written] = wait_for(lambda: list(set(storage.rglob("*.dcm")) - before), what="the upload's stored file")
        wait_for(
            lambda: stack.sql(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ),
            what="the upload to wait for its commit",
        )
        # In flight: the sweep leaves it alone.
        assert stack.manage("shell", "--no-imports", "-c", sweep).stdout.strip() == "0"
        assert written.exists()
        stack.server.stop(signal.SIGKILL)
        sender.stop()
    finally:
        holder.close()
    stack.server = stack.start_server()
    name = str(written.relative_to(storage))
    wait_for(
        lambda: (
            not stack.sql(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        ),
        what="the killed upload's transaction to end",
    )
    assert stack.sql("SELECT count(*) FROM routing_instance WHERE file = %s", name) == [(0,)]
    assert written.exists()

    # Once older than the grace, it goes, with an audit row that names it.
    old = time.time() - 2 * 3600
    os.utime(written, (old, old))
    assert stack.manage("shell", "--no-imports", "-c", sweep).stdout.strip() == "1"
    assert not written.exists()
    assert stack.sql("SELECT object_id FROM centers_auditevent WHERE action = 'storage.orphan_delete'") == [(name,)]
