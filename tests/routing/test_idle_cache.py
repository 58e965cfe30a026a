"""The idle poll's per-process cache (routing.idle_poll.IdleCache): what it may answer, and for how long."""

import pytest

from routing import notify
from routing.idle_poll import ASK, EMPTY, FULL_PATH, IdleCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def cache(clock):
    cache = IdleCache(ttl=2.0, clock=clock)
    cache.up()
    return cache


def remember(cache, digest="k1", *, center_id=7, fresh_for=30.0, empty=True, first_lease_ends_in=None, version=None):
    cache.store(
        digest,
        version=cache.version if version is None else version,
        center_id=center_id,
        fresh_for=fresh_for,
        nothing_to_lease=empty,
        first_lease_ends_in=first_lease_ends_in,
    )


def test_it_answers_an_empty_queue_it_has_read(cache):
    assert cache.answer("k1") == ASK
    remember(cache)
    assert cache.answer("k1") == EMPTY


def test_it_forgets_every_answer_after_its_lifetime(cache, clock):
    remember(cache)
    clock.now += 1.9
    assert cache.answer("k1") == EMPTY
    clock.now += 0.2
    assert cache.answer("k1") == ASK


def test_it_does_not_call_a_queue_empty_past_its_first_lease_expiry(cache, clock):
    remember(cache, first_lease_ends_in=0.5)
    assert cache.answer("k1") == EMPTY
    clock.now += 0.6
    assert cache.answer("k1") == ASK


def test_it_asks_again_when_the_center_has_work(cache):
    remember(cache, empty=False)
    assert cache.answer("k1") == ASK


def test_it_sends_a_key_whose_last_use_is_due_to_django_without_reading(cache, clock):
    remember(cache, fresh_for=0.5)
    assert cache.answer("k1") == EMPTY
    clock.now += 0.6
    assert cache.answer("k1") == FULL_PATH
    remember(cache, fresh_for=-3.0)
    assert cache.answer("k1") == FULL_PATH


def test_it_sends_one_poll_to_django_to_record_a_use_and_answers_the_others_until_it_reads_again(cache, clock):
    remember(cache, fresh_for=0.5)
    clock.now += 0.6
    assert cache.answer("k1") == FULL_PATH
    assert cache.answer("k1") == EMPTY
    assert cache.answer("k1") == EMPTY
    clock.now += cache.ttl
    assert cache.answer("k1") == ASK


def test_it_forgets_a_centers_empty_queue_when_deliveries_are_queued_for_it(cache):
    remember(cache, "k1", center_id=7)
    remember(cache, "k2", center_id=8)
    for payload in notify.payloads(notify.QUEUED, [7, 9]):
        cache.notified(payload)
    assert cache.answer("k1") == ASK
    assert cache.answer("k2") == EMPTY


def test_it_forgets_a_centers_keys_when_its_access_changes(cache):
    remember(cache, "k1", center_id=7)
    remember(cache, "k2", center_id=8)
    cache.notified(notify.payloads(notify.KEYS, [7])[0])
    assert "k1" not in cache.keys
    assert cache.answer("k1") == ASK
    assert cache.answer("k2") == EMPTY


def test_it_forgets_everything_on_a_message_it_cannot_read(cache):
    remember(cache)
    cache.notified("d:seven")
    assert cache.answer("k1") == ASK


def test_it_does_not_keep_a_read_that_a_notification_overtook(cache):
    version = cache.version
    cache.notified("d:99")  # arrives while the read is in flight
    remember(cache, version=version)
    assert cache.answer("k1") == ASK


def test_it_neither_answers_nor_keeps_anything_while_the_listener_is_down(cache):
    remember(cache)
    cache.down()
    assert cache.answer("k1") == ASK
    remember(cache)
    assert cache.answer("k1") == ASK
    cache.up()
    assert cache.answer("k1") == ASK  # what was read while down may have missed a notification
    remember(cache)
    assert cache.answer("k1") == EMPTY


def test_it_stays_bounded(clock):
    cache = IdleCache(ttl=2.0, clock=clock, max_entries=3)
    cache.up()
    for n in range(10):
        remember(cache, f"k{n}", center_id=n)
    assert len(cache.keys) <= 3
    assert len(cache.empty) <= 3
    assert cache.answer("k9") == EMPTY


def test_its_messages_stay_under_postgresqls_payload_limit():
    messages = notify.payloads(notify.QUEUED, range(100_000, 103_000))
    assert len(messages) > 1
    assert all(len(m.encode()) < 8000 for m in messages)
    ids = set()
    for message in messages:
        kind, part = notify.parse(message)
        assert kind == notify.QUEUED
        ids |= part
    assert ids == set(range(100_000, 103_000))
    assert notify.payloads(notify.QUEUED, []) == []
