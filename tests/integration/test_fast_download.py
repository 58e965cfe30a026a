"""Downloads without nginx (routing.fast_download): uvicorn alone sends a leased delivery's file from its event
loop, with Django's answer and audit row, and hands every other case to Django."""

import hashlib
from pathlib import Path

import httpx
import pytest

from bench.dataset import big_instance
from tests.dicomfiles import write_study
from tests.integration.stack import wait_for

pytestmark = pytest.mark.integration

# Set by the server, not by the portal.
TRANSPORT_HEADERS = {"date", "server"}


def _audited(stack, action: str, delivery_ids: list[int]) -> int:
    return stack.sql(
        "SELECT count(*) FROM centers_auditevent WHERE action = %s AND object_type = 'delivery'"
        " AND object_id = ANY(%s)",
        action,
        [str(i) for i in delivery_ids],
    )[0][0]


def _lease(stack, key: str, count: int) -> list[dict]:
    headers = {"Authorization": f"Bearer {key}"}
    leased: list[dict] = []

    def more() -> bool:
        answer = httpx.get(f"{stack.url}/api/v1/deliveries", params={"limit": 10}, headers=headers, timeout=30)
        leased.extend(answer.raise_for_status().json())
        return len(leased) >= count

    wait_for(more, what=f"{count} deliveries to lease")
    return leased


def _publish(stack, network, tmp_path, series: dict[str, int]) -> dict[Path, str]:
    study = write_study(tmp_path / "outbox", series=series)
    sent = stack.agent(network.keys["own"], "send", str(tmp_path / "outbox"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    return study


def test_an_agent_receives_a_study_from_uvicorn_alone_and_every_download_is_audited(
    postgres_stack, pg_network, tmp_path
):
    stack = postgres_stack
    study = write_study(tmp_path / "outbox", series={"CT": 6})
    # One file past the fast path's read size, sent in several pieces.
    big = big_instance(tmp_path / "outbox", seed=3, megabytes=3)
    sent = stack.agent(pg_network.keys["own"], "send", str(tmp_path / "outbox"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    expected = {hashlib.sha256(p.read_bytes()).hexdigest() for p in [*study, big]}

    def received() -> bool:
        result = stack.agent(pg_network.keys["partner"], "receive", "--inbox", str(inbox), "--once")
        assert result.returncode == 0, result.stdout + result.stderr
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in inbox.rglob("*.dcm")} == expected

    wait_for(received, interval=0.5, what="the study in the partner's inbox")
    delivered = [
        row[0]
        for row in stack.sql(
            "SELECT d.id FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id"
            " WHERE c.slug = %s AND d.status = 'delivered'",
            f"partner-{pg_network.s}",
        )
    ]
    assert len(delivered) == 7
    assert _audited(stack, "delivery.download", delivered) == 7


def test_the_event_loop_answers_as_django_does(postgres_stack, pg_network, tmp_path):
    stack = postgres_stack
    _publish(stack, pg_network, tmp_path, {"MR": 1})
    key = pg_network.keys["partner"]
    item = _lease(stack, key, 1)[0]
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{stack.url}/api/v1/deliveries/{item['id']}/file"
    fast = httpx.get(url, headers=headers, timeout=30)  # leased, the key just used: the event loop
    ack = httpx.post(f"{url.removesuffix('/file')}/ack", json={"sha256": item["sha256"]}, headers=headers, timeout=30)
    assert ack.status_code == 200
    django = httpx.get(url, headers=headers, timeout=30)  # delivered, not leased: Django
    for answer in (fast, django):
        assert answer.status_code == 200
        assert hashlib.sha256(answer.content).hexdigest() == item["sha256"]
    assert {(k, v) for k, v in fast.headers.items() if k not in TRANSPORT_HEADERS} == {
        (k, v) for k, v in django.headers.items() if k not in TRANSPORT_HEADERS
    }
    assert fast.headers["content-disposition"] == f'attachment; filename="{item["sop_instance_uid"]}.dcm"'
    assert fast.headers["x-checksum-sha256"] == item["sha256"]
    assert _audited(stack, "delivery.download", [item["id"]]) == 2


def test_another_centers_delivery_is_404_and_no_key_is_401(postgres_stack, pg_network, tmp_path):
    stack = postgres_stack
    _publish(stack, pg_network, tmp_path, {"CT": 1})
    item = _lease(stack, pg_network.keys["partner"], 1)[0]
    url = f"{stack.url}/api/v1/deliveries/{item['id']}/file"
    # The outsider's key was used a moment ago too, as the fast path requires.
    httpx.get(
        f"{stack.url}/api/v1/deliveries", headers={"Authorization": f"Bearer {pg_network.keys['outsider']}"}, timeout=30
    )
    stranger = httpx.get(url, headers={"Authorization": f"Bearer {pg_network.keys['outsider']}"}, timeout=30)
    assert stranger.status_code == 404
    assert stranger.json() == {"error": "No such delivery."}
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer dx_not-a-key"}, timeout=30).status_code == 401
    assert _audited(stack, "delivery.download", [item["id"]]) == 0


def test_a_missing_stored_file_fails_the_delivery_with_410(postgres_stack, pg_network, tmp_path):
    stack = postgres_stack
    _publish(stack, pg_network, tmp_path, {"US": 1})
    item = _lease(stack, pg_network.keys["outsider"], 1)[0]
    stored = stack.sql(
        "SELECT i.file FROM routing_instance i JOIN routing_delivery d ON d.instance_id = i.id WHERE d.id = %s",
        item["id"],
    )[0][0]
    (Path(stack.env["DICOM_STORAGE_DIR"]) / stored).unlink()
    headers = {"Authorization": f"Bearer {pg_network.keys['outsider']}"}
    answer = httpx.get(f"{stack.url}/api/v1/deliveries/{item['id']}/file", headers=headers, timeout=30)
    assert answer.status_code == 410
    assert "missing" in answer.json()["error"]
    assert stack.sql("SELECT status FROM routing_delivery WHERE id = %s", item["id"]) == [("failed",)]
    assert _audited(stack, "delivery.fail", [item["id"]]) == 1
    assert _audited(stack, "delivery.download", [item["id"]]) == 0
