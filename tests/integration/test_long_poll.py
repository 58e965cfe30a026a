"""The delivery long poll on the real stack, when the agent that asked is gone."""

import time

import httpx
import pytest

from tests.dicomfiles import write_study
from tests.integration.stack import wait_for

pytestmark = pytest.mark.integration


def deliveries_of(stack, slug: str) -> list[tuple]:
    return stack.sql(
        "SELECT d.status FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s", slug
    )


WAIT = 15


def test_a_long_poll_whose_agent_hung_up_leases_nothing(postgres_stack, pg_network, tmp_path):
    stack, partner = postgres_stack, f"partner-{pg_network.s}"
    # An agent starts a long poll and goes away (killed, restarted) while it waits.
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {pg_network.keys['partner']}"}) as client:
        asked = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            client.get("/api/v1/deliveries", params={"wait": WAIT}, timeout=httpx.Timeout(30, read=1))

    write_study(tmp_path / "outbox", series={"CT": 1})
    sent = stack.agent(pg_network.keys["own"], "send", str(tmp_path / "outbox"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(lambda: deliveries_of(stack, partner), what="the fan-out to the partner")
    # Until the abandoned poll's own deadline is past it could still lease, however slowly the
    # busy machine runs it; the portal may have started it a few seconds after it was sent.
    time.sleep(max(0.0, asked + WAIT + 5 - time.monotonic()))
    assert deliveries_of(stack, partner) == [("queued",)]

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    received = stack.agent(pg_network.keys["partner"], "receive", "--inbox", str(inbox), "--once")
    assert received.returncode == 0, received.stdout + received.stderr
    assert len(list(inbox.rglob("*.dcm"))) == 1
