"""The idle poll's fast path (routing.idle_poll) on the real stack: it only ever answers an empty queue."""

import httpx
import pytest

from tests.dicomfiles import write_study
from tests.integration.stack import wait_for

pytestmark = pytest.mark.integration


def poll(stack, key: str, **params) -> httpx.Response:
    return httpx.get(
        f"{stack.url}/api/v1/deliveries", params={"wait": 0, **params}, headers={"Authorization": f"Bearer {key}"}
    )


def test_an_idle_poll_gets_the_same_answer_as_through_django(postgres_stack, pg_network):
    stack, key = postgres_stack, pg_network.keys["partner"]
    first = poll(stack, key)  # the key's first use: recorded by the full path
    second = poll(stack, key)  # recently used, nothing queued: the fast path
    for response in (first, second):
        assert response.status_code == 200
        assert response.json() == []
    ignored = {"date", "server", "content-length"}
    assert {h for h in second.headers if h not in ignored} == {h for h in first.headers if h not in ignored}
    assert second.headers["content-type"] == first.headers["content-type"]


def test_a_revoked_key_or_a_center_that_may_not_receive_is_refused_right_after_an_idle_poll(postgres_stack, pg_network):
    stack = postgres_stack
    for role in ("mr", "partner"):
        poll(stack, pg_network.keys[role])
        assert poll(stack, pg_network.keys[role]).status_code == 200
    stack.sql("UPDATE centers_center SET may_subscribe = false WHERE slug = %s RETURNING id", f"mr-{pg_network.s}")
    assert poll(stack, pg_network.keys["mr"]).status_code == 403
    stack.sql(
        "UPDATE centers_apikey k SET revoked_at = now() FROM centers_center c"
        " WHERE c.id = k.center_id AND c.slug = %s RETURNING k.id",
        f"partner-{pg_network.s}",
    )
    assert poll(stack, pg_network.keys["partner"]).status_code == 401


def test_bad_parameters_and_a_queue_with_work_go_the_full_way(postgres_stack, pg_network, tmp_path):
    stack, key = postgres_stack, pg_network.keys["partner"]
    poll(stack, key)
    assert poll(stack, key).json() == []
    assert poll(stack, key, wait="soon").status_code == 400
    assert poll(stack, key, limit="-1").status_code == 400

    write_study(tmp_path / "outbox", series={"CT": 1})
    sent = stack.agent(pg_network.keys["own"], "send", str(tmp_path / "outbox"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    count = "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s"
    wait_for(lambda: stack.sql(count, f"partner-{pg_network.s}")[0][0] == 1, what="the fan-out")
    leased = poll(stack, key)
    assert leased.status_code == 200
    assert len(leased.json()) == 1
