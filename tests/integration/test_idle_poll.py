"""The idle poll's fast path (routing.idle_poll) on the real stack: it only ever answers an empty queue.

A client with keep-alive talks to one uvicorn worker, so its polls meet that worker's cache.
"""

import threading
import time

import httpx
import psycopg
import pytest

from routing.idle_poll import CACHE_SECONDS, LISTENER_NAME
from tests.dicomfiles import write_study
from tests.integration.stack import wait_for

pytestmark = pytest.mark.integration


def poll(stack, key: str, client=httpx, **params) -> httpx.Response:
    return client.get(
        f"{stack.url}/api/v1/deliveries", params={"wait": 0, **params}, headers={"Authorization": f"Bearer {key}"}
    )


def warm(stack, key: str, client) -> None:
    """The key's first use goes through Django; the polls after it are read once and then cached."""
    assert poll(stack, key, client).status_code == 200
    time.sleep(0.5)  # the worker's listener connects on its first poll
    assert poll(stack, key, client).json() == []


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


def test_it_refuses_a_key_revoked_behind_its_back_within_the_cache_lifetime(postgres_stack, pg_network):
    stack = postgres_stack
    with httpx.Client() as mr, httpx.Client() as partner:
        warm(stack, pg_network.keys["mr"], mr)
        warm(stack, pg_network.keys["partner"], partner)
        # Plain SQL tells no cache: only the cache's lifetime bounds the answer.
        stack.sql("UPDATE centers_center SET may_subscribe = false WHERE slug = %s RETURNING id", f"mr-{pg_network.s}")
        stack.sql(
            "UPDATE centers_apikey k SET revoked_at = now() FROM centers_center c"
            " WHERE c.id = k.center_id AND c.slug = %s RETURNING k.id",
            f"partner-{pg_network.s}",
        )
        changed = time.monotonic()
        wait_for(lambda: poll(stack, pg_network.keys["mr"], mr).status_code == 403, interval=0.05, what="the 403")
        wait_for(
            lambda: poll(stack, pg_network.keys["partner"], partner).status_code == 401, interval=0.05, what="the 401"
        )
        assert time.monotonic() - changed < CACHE_SECONDS + 1


def test_it_refuses_a_key_revoked_through_the_portal_on_the_next_poll(postgres_stack, pg_network):
    stack, key = postgres_stack, pg_network.keys["partner"]
    with httpx.Client() as client:
        warm(stack, key, client)
        stack.manage(
            "shell",
            "-c",
            "from centers.models import ApiKey; from centers.services import apikey_revoke;"
            f" apikey_revoke(api_key=ApiKey.objects.get(center__slug='partner-{pg_network.s}'))",
        )
        assert poll(stack, key, client).status_code == 401


def test_it_sees_a_delivery_queued_after_an_idle_answer_on_the_very_next_poll(postgres_stack, pg_network, tmp_path):
    stack, key = postgres_stack, pg_network.keys["partner"]
    count = "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s"
    write_study(tmp_path / "outbox", series={"CT": 1})
    with httpx.Client() as client:
        warm(stack, key, client)
        sender = threading.Thread(
            target=stack.agent, args=(pg_network.keys["own"], "send", str(tmp_path / "outbox")), daemon=True
        )
        sender.start()
        # Idle polls keep the worker's "nothing to lease" fresh until the fan-out commits...
        leased = []
        while not leased and stack.sql(count, f"partner-{pg_network.s}")[0][0] == 0:
            leased = poll(stack, key, client).json()
            time.sleep(0.05)
        # ...and the first poll after it (if not the one that raced it) takes the delivery.
        leased = leased or poll(stack, key, client).json()
        sender.join(timeout=60)
    assert len(leased) == 1


def test_it_answers_a_cached_idle_poll_without_reading_the_database(postgres_stack, pg_network):
    stack, key = postgres_stack, pg_network.keys["partner"]
    with httpx.Client(timeout=1.5) as client, psycopg.connect(stack.env["DATABASE_URL"]) as locker:
        warm(stack, key, client)
        # Any read of the queue now waits for this transaction.
        locker.execute("LOCK TABLE routing_delivery IN ACCESS EXCLUSIVE MODE")
        try:
            response = poll(stack, key, client)
        finally:
            locker.rollback()
    assert response.status_code == 200
    assert response.json() == []


def test_it_reads_every_poll_while_its_listener_is_down(postgres_stack, pg_network):
    stack, key = postgres_stack, pg_network.keys["partner"]
    with httpx.Client() as client:
        warm(stack, key, client)
        database = stack.env["DATABASE_URL"].rpartition("/")[2]
        terminated = stack.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            database,
            LISTENER_NAME,
        )
        assert terminated
        time.sleep(0.2)
        stack.sql(
            "UPDATE centers_apikey k SET revoked_at = now() FROM centers_center c"
            " WHERE c.id = k.center_id AND c.slug = %s RETURNING k.id",
            f"partner-{pg_network.s}",
        )
        assert poll(stack, key, client).status_code == 401


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
