"""One center flooding uploads is answered 429 while another center's steady uploads go on.

Latency is measured and printed, never asserted (the machine is shared); the functional
part is asserted: the flooder gets 429 with Retry-After, the steady center gets none and
all its uploads are stored. The p95 comparison as a target belongs to `make bench`.
"""

import statistics
import threading
import time
import uuid

import httpx
import pytest

from tests.dicomfiles import dicom_bytes
from tests.integration.stack import free_port

pytestmark = pytest.mark.integration

RATE = "10/s"


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def upload(client: httpx.Client, key: str) -> tuple[httpx.Response, str, float]:
    sop_uid = f"2.25.{uuid.uuid4().int}"
    body = dicom_bytes("CT", sop_uid=sop_uid)
    started = time.perf_counter()
    response = client.post(
        "/api/v1/instances",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/dicom"},
    )
    return response, sop_uid, time.perf_counter() - started


def steady(url: str, key: str, count: int) -> tuple[list[float], list[httpx.Response], list[str]]:
    """One upload at a time, well under the rate: an agent at work on an ordinary day."""
    latencies, answers, uids = [], [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(count):
            response, sop_uid, seconds = upload(client, key)
            latencies.append(seconds)
            answers.append(response)
            uids.append(sop_uid)
            time.sleep(0.25)
    return latencies, answers, uids


def test_a_flooding_center_is_answered_429_while_another_centers_uploads_are_all_stored(pg_network, postgres_stack):
    stack = postgres_stack
    port = free_port()
    # Redis holds the counters, shared by the server's two processes as in production.
    stack.start_server(
        port=port,
        env={**stack.env, "API_RATE_LIMIT": RATE, "CACHE_URL": "redis://127.0.0.1:6379/0"},
        name="server-rate-limited",
    )
    url = f"http://127.0.0.1:{port}"
    steady_key, flood_key = pg_network.keys["own"], pg_network.keys["outsider"]

    alone, alone_answers, alone_uids = steady(url, steady_key, 30)

    stop = threading.Event()
    flood_answers: list[httpx.Response] = []

    def flood() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                flood_answers.append(upload(client, flood_key)[0])

    flooders = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
    for thread in flooders:
        thread.start()
    try:
        flooded, flooded_answers, flooded_uids = steady(url, steady_key, 30)
    finally:
        stop.set()
        for thread in flooders:
            thread.join(60)

    refused = [r for r in flood_answers if r.status_code == 429]
    print(
        f"steady center's upload p95: {p95(alone) * 1000:.1f} ms alone, {p95(flooded) * 1000:.1f} ms"
        f" beside a flood ({len(flood_answers)} flood uploads, {len(refused)} answered 429)"
    )
    assert refused, "the flooding center was never limited"
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert all(r.json()["error"] for r in refused)
    assert {r.status_code for r in flood_answers} <= {201, 429}
    steady_answers = alone_answers + flooded_answers
    assert [r.status_code for r in steady_answers] == [201] * len(steady_answers)
    uids = alone_uids + flooded_uids
    stored = {
        uid
        for (uid,) in stack.sql("SELECT sop_instance_uid FROM routing_instance WHERE sop_instance_uid = ANY(%s)", uids)
    }
    assert stored == set(uids)
