"""Outages: the broker down during an upload, the portal restarting under a receiving agent."""

import signal

import pytest

from tests.dicomfiles import dicom_bytes, write_study
from tests.integration.stack import free_port, wait_for

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

    [path] = wait_for(arrived, timeout=60, interval=1, what="the swept instance to arrive")
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
        wait_for(lambda: len(list(inbox.rglob("*.dcm"))) == 2, timeout=60, what="2 files after the restart")
        assert {p.name for p in inbox.rglob("*.dcm")} == {f"{uid}.dcm" for uid in study.values()}
        assert receiver.popen.poll() is None, "the agent gave up"
    finally:
        receiver.stop()
    assert not list(inbox.rglob("*.part")), "a partial file was left behind"
