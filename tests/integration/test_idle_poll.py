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
        f"{stack.url}/api/v1/deliveries",
        params={"wait": 0, **params},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def listeners(stack) -> set[int]:
    """The backends of the web workers' idle-poll listeners on this stack's database."""
    database = stack.env["DATABASE_URL"].rpartition("/")[2]
    rows = stack.sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s", database, LISTENER_NAME
    )
    return {pid for (pid,) in rows}


def warm(stack, key: str, client) -> None:
    """The key's first use goes through Django; the polls after it are read once and then cached."""
    assert poll(stack, key, client).status_code == 200
    # The worker's listener connects on its first poll; until it listens, nothing is cached.
    wait_for(lambda: listeners(stack), what="an idle-poll listener")
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
        # What was cached before the change expires within CACHE_SECONDS of it: a poll sent later
        # must be refused, however long the busy machine takes to answer it.
        stale = []

        def refused(key: str, client: httpx.Client, status: int) -> bool:
            sent = time.monotonic()
            answer = poll(stack, key, client).status_code
            if answer != status and sent - changed > CACHE_SECONDS:
                stale.append((round(sent - changed, 2), answer))
            return answer == status

        wait_for(lambda: refused(pg_network.keys["mr"], mr, 403), interval=0.05, what="the 403")
        wait_for(lambda: refused(pg_network.keys["partner"], partner, 401), interval=0.05, what="the 401")
        assert stale == [], f"answered after the cache lifetime (seconds after the change, status): {stale}"


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

    def answered_while_locked() -> httpx.Response | None:
        with httpx.Client() as client, psycopg.connect(stack.env["DATABASE_URL"]) as locker:
            warm(stack, key, client)
            # Any read of the queue now waits for this transaction.
            locker.execute("LOCK TABLE routing_delivery IN ACCESS EXCLUSIVE MODE")
            try:
                return client.get(
                    f"{stack.url}/api/v1/deliveries",
                    params={"wait": 0},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=httpx.Timeout(10, read=CACHE_SECONDS),
                )
            except httpx.ReadTimeout:
                # The poll read the database: on a busy machine the warm answer may have aged past
                # CACHE_SECONDS (or met a worker not yet listening) before it was sent. Warm it again;
                # a fast path that never answers from its cache fails every round.
                return None
            finally:
                locker.rollback()

    response = wait_for(answered_while_locked, interval=0.5, what="an idle poll answered while the queue is locked")
    assert response.status_code == 200
    assert response.json() == []


def test_it_forgets_what_it_cached_once_its_listener_lost_the_connection(postgres_stack, pg_network):
    stack, key = postgres_stack, pg_network.keys["partner"]
    with httpx.Client() as client:
        warm(stack, key, client)
        # Plain SQL tells no cache: only the lost connection may make the worker read again.
        stack.sql(
            "UPDATE centers_apikey k SET revoked_at = now() FROM centers_center c"
            " WHERE c.id = k.center_id AND c.slug = %s RETURNING k.id",
            f"partner-{pg_network.s}",
        )
        old = listeners(stack)
        assert old
        stack.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)", list(old))
        # Its worker noticed once it listens again on a new connection: whether it polls while
        # down or after, nothing read before the loss may answer.
        wait_for(lambda: listeners(stack) and not listeners(stack) & old, what="the listeners to reconnect")
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
