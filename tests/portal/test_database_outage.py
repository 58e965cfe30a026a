"""A PostgreSQL that restarts or drops connections answers 503 with Retry-After, never 500."""

import psycopg
import pytest
from django.db import connection
from django.test import Client

pytestmark = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="connection pooling and its checks are PostgreSQL's"
)


@pytest.fixture(autouse=True)
def _drop_the_dead_connection(transactional_db):
    yield
    # The test database is flushed after each test, on a live connection.
    connection.close()


def _terminate_other_backends() -> int:
    """What a PostgreSQL restart does to every connection the portal holds or keeps pooled."""
    params = connection.get_connection_params()
    with psycopg.connect(
        dbname=connection.settings_dict["NAME"],
        host=params.get("host"),
        port=params.get("port"),
        user=params.get("user"),
        password=params.get("password"),
        autocommit=True,
    ) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


def test_a_request_whose_connection_dies_answers_503_with_retry_after(transactional_db, keys):
    client = Client(raise_request_exception=False)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {keys['partner']}"}
    assert client.get("/api/v1/deliveries", **auth).status_code == 200
    # The test client keeps the thread's connection between requests: the next one runs on it.
    assert _terminate_other_backends() >= 1

    response = client.get("/api/v1/deliveries", **auth)

    assert response.status_code == 503
    assert response["Content-Type"] == "application/json"
    assert int(response["Retry-After"]) > 0
    assert "database" in response.json()["error"]


def test_pooled_connections_killed_while_idle_are_replaced_before_a_request_uses_them(transactional_db, keys):
    client = Client(raise_request_exception=False)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {keys['partner']}"}
    assert client.get("/api/v1/deliveries", **auth).status_code == 200
    connection.close()  # as at the end of a request: back to the pool, idle
    assert connection.pool is not None
    assert _terminate_other_backends() >= 1

    assert client.get("/api/v1/deliveries", **auth).status_code == 200
