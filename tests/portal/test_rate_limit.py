"""The API's per-key rate limit (centers.throttling): 429 with Retry-After for that key alone."""

import pytest

from centers.throttling import key_counter
from portal.bridge import RATE_COUNTED
from tests.dicomfiles import dicom_bytes


@pytest.fixture(autouse=True)
def fresh_counters(settings):
    settings.API_RATE_LIMIT = "3/m"
    key_counter().clear()
    yield
    key_counter().clear()


def poll(client, key: str):
    return client.get("/api/v1/deliveries", HTTP_AUTHORIZATION=f"Bearer {key}")


def test_a_key_past_its_rate_is_answered_429_with_retry_after_and_a_json_error(client, keys):
    for _ in range(3):
        assert poll(client, keys["partner"]).status_code == 200

    refused = poll(client, keys["partner"])

    assert refused.status_code == 429
    assert refused["Content-Type"] == "application/json"
    assert 0 < int(refused["Retry-After"]) <= 60
    assert "throttled" in refused.json()["error"].lower()


def test_another_centers_key_is_unaffected(client, keys):
    for _ in range(4):
        poll(client, keys["partner"])
    assert poll(client, keys["partner"]).status_code == 429

    assert poll(client, keys["outsider"]).status_code == 200


def test_uploads_count_against_the_same_budget(agents, keys, client):
    for _ in range(3):
        assert agents["own"].upload(dicom_bytes("CT")).status_code == 201

    refused = agents["own"].upload(dicom_bytes("CT"))

    assert refused.status_code == 429
    assert "Retry-After" in refused
    from routing.models import Instance

    assert Instance.objects.count() == 3


def test_a_request_the_bridge_counted_is_not_counted_again(client, keys):
    marked = {RATE_COUNTED: True}
    assert all(
        client.get("/api/v1/deliveries", HTTP_AUTHORIZATION=f"Bearer {keys['partner']}", **marked).status_code == 200
        for _ in range(5)
    )
    assert [poll(client, keys["partner"]).status_code for _ in range(4)] == [200, 200, 200, 429]


def test_an_empty_setting_turns_the_limit_off(client, keys, settings):
    settings.API_RATE_LIMIT = ""
    assert all(poll(client, keys["partner"]).status_code == 200 for _ in range(10))


def test_a_request_without_a_key_is_answered_by_authentication_not_the_limit(client, keys):
    assert all(client.get("/api/v1/deliveries").status_code == 401 for _ in range(5))
