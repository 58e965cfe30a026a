"""STAT first on the real stack: PostgreSQL, RabbitMQ, a worker and a stat worker, real agents and dcmtk's storescu.

With the main worker stopped, routine fan-outs wait in the main queue while the stat worker
routes what `agent send --priority stat` and an `agent scp` association from a stat calling
AE title uploaded: stat fan-out does not queue behind routine fan-out. Once the main worker
is back, the center's lease hands out the two stat instances before every routine one.
"""

import httpx
import pytest
from pydicom import dcmread

from tests.dicomfiles import dicom_bytes
from tests.edge.conftest import agent, dcmtk, wait_for_port
from tests.integration.stack import free_port, wait_for

pytestmark = pytest.mark.integration

ROUTINE_FILES = 20
STAT_AET = "ER_CT"


def deliveries(stack, center_slug: str) -> dict[str, int]:
    """SOP Instance UID -> priority of the center's deliveries."""
    return dict(
        stack.sql(
            "SELECT i.sop_instance_uid, d.priority FROM routing_delivery d "
            "JOIN routing_instance i ON i.id = d.instance_id JOIN centers_center c ON c.id = d.center_id "
            "WHERE c.slug = %s",
            center_slug,
        )
    )


def test_stat_instances_are_routed_by_their_own_worker_and_leased_first(postgres_stack, pg_network, tmp_path):
    stack, net = postgres_stack, pg_network
    own, partner = net.keys["own"], net.keys["partner"]
    [worker] = [p for p in stack.processes if p.name == "worker"]
    worker.stop()  # a warm shutdown: the main queue now has no consumer, the stat queue still has one

    routine = tmp_path / "routine"
    routine.mkdir()
    for n in range(ROUTINE_FILES):
        (routine / f"{n:03d}.dcm").write_bytes(dicom_bytes("CT", instance_number=n))
    sent = stack.agent(own, "send", str(routine))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert f"{ROUTINE_FILES} sent" in sent.stdout

    by_send = tmp_path / "stat-send.dcm"
    by_send.write_bytes(dicom_bytes("CT", instance_number=100))
    sent = stack.agent(own, "send", "--priority", "stat", str(by_send))
    assert sent.returncode == 0, sent.stdout + sent.stderr

    by_scp = tmp_path / "stat-scp.dcm"
    by_scp.write_bytes(dicom_bytes("CT", instance_number=101))
    port = free_port()
    scp = agent(
        stack,
        "--server", stack.url, "--key", own,
        "scp", "--ae-title", "EXCHANGE", "--bind", "127.0.0.1", "--port", str(port),
        "--spool", str(tmp_path / "spool"), "--stat-ae", STAT_AET,
        name="agent-scp",
    )  # fmt: skip
    wait_for_port(port)
    stored = dcmtk("storescu", "-aet", STAT_AET, "-aec", "EXCHANGE", "127.0.0.1", str(port), str(by_scp))
    assert stored.returncode == 0, stored.stdout + stored.stderr

    stat_sops = {str(dcmread(path).SOPInstanceUID) for path in (by_send, by_scp)}
    slug = f"partner-{net.s}"
    wait_for(
        lambda: set(deliveries(stack, slug)) >= stat_sops,
        what="the stat instances routed by the stat worker alone",
    )
    assert deliveries(stack, slug) == dict.fromkeys(stat_sops, 1)
    [[unrouted]] = stack.sql(
        "SELECT count(*) FROM routing_instance i JOIN centers_center c ON c.id = i.source_center_id "
        "WHERE c.slug = %s AND i.routed_at IS NULL",
        f"own-{net.s}",
    )
    assert unrouted == ROUTINE_FILES
    scp.stop()

    stack.start_worker()
    wait_for(lambda: len(deliveries(stack, slug)) == ROUTINE_FILES + 2, what="the routine fan-outs, once a worker runs")

    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {partner}"}, timeout=60) as client:
        lease = client.get("/api/v1/deliveries", params={"limit": 100})
    assert lease.status_code == 200
    items = lease.json()
    assert len(items) == ROUTINE_FILES + 2
    assert {item["sop_instance_uid"] for item in items[:2]} == stat_sops
    assert [item["priority"] for item in items] == ["stat"] * 2 + ["routine"] * ROUTINE_FILES


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_on_the_embedded_default_a_stat_upload_is_leased_before_the_routine_ones(stack, network, tmp_path):
    routine = tmp_path / "routine"
    routine.mkdir()
    for n in range(5):
        (routine / f"{n:03d}.dcm").write_bytes(dicom_bytes("CT", instance_number=n))
    stat = tmp_path / "stat.dcm"
    stat.write_bytes(dicom_bytes("CT", instance_number=100))
    for args in (["send", str(routine)], ["send", "--priority", "stat", str(stat)]):
        sent = stack.agent(network.keys["own"], *args)
        assert sent.returncode == 0, sent.stdout + sent.stderr

    # No broker: each fan-out ran in its upload's request, so the deliveries are there already.
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {network.keys['partner']}"}) as client:
        items = client.get("/api/v1/deliveries", params={"limit": 100}).json()

    assert [item["priority"] for item in items] == ["stat"] + ["routine"] * 5
    assert items[0]["sop_instance_uid"] == str(dcmread(stat).SOPInstanceUID)
