"""centers.ratelimit: a window per key digest, raised and read in one step, in memory or in Redis."""

import asyncio
import threading
import uuid

import pytest
import redis

from centers.ratelimit import REDIS_PREFIX, MemoryCounter, Rate, RedisCounter, bearer_identity, parse_rate
from centers.services import key_digest
from tests.integration.stack import free_port, wait_for

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["memory", "redis"])
def counter(request):
    return MemoryCounter() if request.param == "memory" else RedisCounter(REDIS_URL)


def identity() -> str:
    # Each test its own keys: the Redis is shared with whatever else runs.
    return key_digest(uuid.uuid4().hex)


def test_a_window_allows_its_count_then_refuses_with_the_seconds_left(counter):
    key, other = identity(), identity()
    rate = Rate(count=3, seconds=60)

    verdicts = [counter.hit(key, rate) for _ in range(4)]

    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert 1 <= verdicts[-1].retry_after <= 60
    assert counter.hit(other, rate).allowed


def test_a_window_opens_again_once_its_period_is_over(counter):
    key = identity()
    rate = Rate(count=1, seconds=1)
    assert counter.hit(key, rate).allowed
    assert not counter.hit(key, rate).allowed

    wait_for(lambda: counter.hit(key, rate).allowed, timeout=10, what="the next window")


def test_requests_racing_from_one_key_never_slip_past_the_limit(counter):
    key = identity()
    rate = Rate(count=100, seconds=60)
    allowed = []
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait()
        allowed.extend(counter.hit(key, rate).allowed for _ in range(40))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sum(allowed) == 100 and len(allowed) == 320


def test_the_event_loops_counting_is_atomic_too(counter):
    key = identity()
    rate = Rate(count=50, seconds=60)

    async def flood():
        return await asyncio.gather(*(counter.ahit(key, rate) for _ in range(120)))

    verdicts = asyncio.run(flood())

    assert sum(v.allowed for v in verdicts) == 50


def test_a_key_refused_in_its_window_is_refused_again_without_a_round_trip_to_redis():
    counter = RedisCounter(REDIS_URL)
    key = identity()
    rate = Rate(count=1, seconds=60)
    assert [counter.hit(key, rate).allowed, counter.hit(key, rate).allowed] == [True, False]

    again = [counter.hit(key, rate) for _ in range(3)] + [asyncio.run(counter.ahit(key, rate))]

    assert not any(v.allowed for v in again) and all(1 <= v.retry_after <= 60 for v in again)
    assert redis.Redis.from_url(REDIS_URL).get(REDIS_PREFIX + key) == b"2"


def test_a_redis_that_does_not_answer_lets_requests_through_rather_than_refuse_them():
    counter = RedisCounter(f"redis://127.0.0.1:{free_port()}/0")
    rate = Rate(count=1, seconds=60)

    assert all(counter.hit("k", rate).allowed for _ in range(3))
    assert asyncio.run(counter.ahit("k", rate)).allowed


def test_the_identity_is_the_digest_a_key_is_stored_under():
    assert bearer_identity(b"Bearer s3cret") == key_digest("s3cret")
    assert bearer_identity("bearer s3cret") == key_digest("s3cret")
    assert bearer_identity(b"Basic dXNlcjpwYXNz") is None
    assert bearer_identity(b"Bearer") is None
    assert bearer_identity(None) is None
    assert bearer_identity("Bearer caf\u00e9".encode("latin-1")) is None


def test_the_rate_setting_reads_like_rest_frameworks():
    assert parse_rate("200/s") == Rate(count=200, seconds=1)
    assert parse_rate("3/m") == Rate(count=3, seconds=60)
    assert parse_rate("5/day") == Rate(count=5, seconds=86400)
    assert parse_rate("") is None
    with pytest.raises(ValueError, match="API_RATE_LIMIT"):
        parse_rate("fast")
