from datetime import timedelta

import pytest
from django.utils import timezone

from centers.models import AgentHeartbeat

URL = "/api/v1/agents/heartbeat"
BEAT = {
    "version": "0.2.0",
    "hostname": "pacs-gw-1",
    "roles": ["receive", "scp"],
    "interval": 60,
    "spool": {"count": 3, "bytes": 4096, "failed": 1},
    "outbox": {"pending": 2, "failed": 0},
}


def beat(client, secret, body=BEAT):
    return client.post(URL, data=body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {secret}")


@pytest.mark.django_db
def test_a_heartbeat_is_recorded_once_per_center_and_host(client, keys, network):
    assert beat(client, keys["partner"]).status_code == 200
    assert beat(client, keys["partner"], {**BEAT, "spool": {"count": 0, "bytes": 0, "failed": 0}}).status_code == 200
    [row] = AgentHeartbeat.objects.all()
    assert (row.center, row.hostname, row.version, row.spool_count, row.outbox_pending) == (
        network["partner"],
        "pacs-gw-1",
        "0.2.0",
        0,
        2,
    )
    assert row.is_online(timezone.now())


@pytest.mark.django_db
def test_a_heartbeat_needs_a_valid_key_and_body(client, keys):
    assert client.post(URL, data=BEAT, content_type="application/json").status_code == 401
    assert beat(client, "dx_nonsense").status_code == 401
    response = beat(client, keys["own"], {"hostname": "x"})
    assert response.status_code == 400
    assert "version" in response.json()["error"]
    assert beat(client, keys["own"], {**BEAT, "spool": {"count": -1}}).status_code == 400
    assert not AgentHeartbeat.objects.exists()


@pytest.mark.django_db
def test_get_names_the_keys_center_and_its_agents_without_recording_anything(client, keys):
    beat(client, keys["partner"])
    response = client.get(URL, HTTP_AUTHORIZATION=f"Bearer {keys['partner']}")
    assert response.status_code == 200
    body = response.json()
    assert body["center"] == {"slug": "tehran-hospital", "name": "Tehran Hospital"}
    assert [(a["hostname"], a["online"]) for a in body["agents"]] == [("pacs-gw-1", True)]
    other = client.get(URL, HTTP_AUTHORIZATION=f"Bearer {keys['own']}").json()
    assert other["agents"] == []
    assert AgentHeartbeat.objects.count() == 1


@pytest.mark.django_db
def test_the_admin_shows_each_centers_agent_online_offline_or_never_seen(admin_client, keys):
    beat(admin_client, keys["partner"])
    beat(admin_client, keys["outsider"], {**BEAT, "hostname": "old-box", "version": "0.1.0"})
    AgentHeartbeat.objects.filter(hostname="old-box").update(last_seen_at=timezone.now() - timedelta(hours=3))
    page = admin_client.get("/admin/centers/center/").content.decode()
    assert "pacs-gw-1 0.2.0: online, last seen" in page
    assert "old-box 0.1.0: offline, last seen 3\xa0hours ago" in page
    assert "never seen" in page  # the publisher runs no agent yet
    detail = admin_client.get("/admin/centers/agentheartbeat/").content.decode()
    assert "pacs-gw-1" in detail and "old-box" in detail


@pytest.mark.django_db
def test_files_the_agent_set_aside_are_stored_returned_and_shown_in_the_admin(admin_client, client, keys):
    failing = {
        **BEAT,
        "spool": {"count": 3, "bytes": 4096, "failed": 2, "retrying": 1},
        "outbox": {"pending": 0, "failed": 1, "retrying": 4},
        "last_failure_at": "2026-11-28T09:30:00Z",
    }
    assert beat(client, keys["partner"], failing).status_code == 200
    row = AgentHeartbeat.objects.get()
    assert (row.spool_failed, row.spool_retrying, row.outbox_failed, row.outbox_retrying) == (2, 1, 1, 4)
    assert (row.failed, row.retrying) == (3, 5)
    assert row.last_failure_at.isoformat() == "2026-11-28T09:30:00+00:00"
    [agent] = client.get(URL, HTTP_AUTHORIZATION=f"Bearer {keys['partner']}").json()["agents"]
    assert agent["failed"] == {"spool": 2, "outbox": 1}
    assert agent["retrying"] == {"spool": 1, "outbox": 4}
    assert agent["last_failure_at"] == "2026-11-28T09:30:00+00:00"
    centers = admin_client.get("/admin/centers/center/").content.decode()
    assert "pacs-gw-1 0.2.0: online" in centers and "3 files set aside" in centers
    agents = admin_client.get("/admin/centers/agentheartbeat/").content.decode()
    assert "3 set aside (spool 2, outbox 1), last " in agents and "5 retrying" in agents
    # An agent from before these fields sends no retrying counts and no time.
    assert beat(client, keys["partner"]).status_code == 200
    row.refresh_from_db()
    assert (row.spool_retrying, row.outbox_retrying, row.last_failure_at) == (0, 0, None)
    agents = admin_client.get("/admin/centers/agentheartbeat/").content.decode()
    assert "1 set aside (spool 1, outbox 0)</td>" in agents and "retrying" not in agents


def test_it_refuses_a_version_longer_than_the_contract_even_when_it_starts_with_a_control_character(client, keys):
    response = client.post(
        "/api/v1/agents/heartbeat",
        data={"version": "\x1c" + "1" * 32, "hostname": "pacs-gw"},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {keys['partner']}",
    )

    assert response.status_code == 400
    assert response.json()["error"].startswith("version:")
