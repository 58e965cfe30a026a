"""Each file's own retries: the two bounds, a record that survives a restart, and outages that count for nothing."""

import threading

import pytest

from agent.client import make_client
from agent.config import load_settings
from agent.retry import Failure, Ledger, RetryPolicy, ledger_path
from agent.spool import Spool
from agent.state import State
from agent.uploads import Drainer, gave_up_reason
from tests.dicomfiles import dicom_bytes
from tests.integration.stack import free_port

BASE = {"server": "https://x.example.org", "key": "k"}


def failure(attempts: int, first: float) -> Failure:
    return Failure(attempts=attempts, first_failed=first, last_failed=first, next_try=first, last_error="HTTP 500")


def test_a_file_is_given_up_only_once_both_the_attempts_and_the_time_are_reached():
    policy = RetryPolicy(max_attempts=10, give_up_after=3600)
    assert not policy.exhausted(failure(50, first=1000), now=1000 + 3599)  # many fast failures: not yet
    assert not policy.exhausted(failure(9, first=1000), now=1000 + 86400)  # a long time, few attempts: not yet
    assert policy.exhausted(failure(10, first=1000), now=1000 + 3600)


def test_a_files_retries_double_and_spread_over_the_time_bound():
    policy = RetryPolicy(max_attempts=10, give_up_after=86400)
    delays = [policy.delay(n) for n in range(1, 30)]
    assert 2.5 <= delays[0] <= 5
    assert all(d <= 8640 for d in delays)  # never more than give_up_after / max_attempts apart
    assert delays[-1] >= 4320
    assert all(policy.delay(1) >= 1 for policy in [RetryPolicy(3, 0), RetryPolicy(1000, 1)])


def test_the_record_survives_a_restart_and_forgets_files_no_longer_waiting(tmp_path):
    path = ledger_path(tmp_path, "outbox", tmp_path / "outbox")
    policy = RetryPolicy(max_attempts=3, give_up_after=60)
    ledger = Ledger(path)
    first = ledger.record("a.dcm|10|1", "HTTP 500", policy, now=1000.0)
    ledger.record("b.dcm|10|1", "ReadError", policy, now=1000.0)
    second = ledger.record("a.dcm|10|1", "HTTP 502", policy, now=1010.0)
    assert (first.attempts, second.attempts, second.first_failed, second.last_error) == (1, 2, 1000.0, "HTTP 502")
    assert not ledger.due("a.dcm|10|1", now=1010.0) and ledger.due("a.dcm|10|1", now=second.next_try)
    assert ledger.due("never-failed.dcm", now=0)

    restarted = Ledger(path)
    assert restarted.retrying() == 2
    assert restarted.record("a.dcm|10|1", "HTTP 500", policy, now=1020.0).attempts == 3
    restarted.keep_only({"a.dcm|10|1"})
    restarted.forget("a.dcm|10|1")
    assert Ledger(path).retrying() == 0 and Ledger(path).next_try() is None


def test_an_unreadable_record_starts_afresh(tmp_path):
    path = tmp_path / "retries-spool-x.json"
    path.write_text("{not json")
    assert Ledger(path).retrying() == 0


def test_the_reason_names_the_last_error_and_the_attempts():
    text = gave_up_reason(
        Failure(attempts=10, first_failed=0.0, last_failed=90000.0, next_try=0.0, last_error="HTTP 500 Internal")
    )
    assert text.splitlines() == [
        "HTTP 500 Internal",
        "gave up after 10 failed attempts over 1.0 d (first 1970-01-01T00:00:00+00:00,"
        " last 1970-01-02T01:00:00+00:00) while the portal took other files",
    ]


def test_a_portal_down_for_everyone_makes_files_wait_but_counts_against_none(tmp_path):
    """Nothing listens at the portal's address: every upload and the health check fail to connect."""
    spool = Spool(tmp_path / "spool")
    for _ in range(3):
        spool.put(dicom_bytes("CT"), "1.2.3")
    settings = load_settings({**BASE, "server": f"http://127.0.0.1:{free_port()}"}, {})
    ledger = Ledger(tmp_path / "retries.json")
    # The harshest bounds: a file's first own failure would set it aside.
    policy = RetryPolicy(max_attempts=1, give_up_after=0)
    with make_client(settings, connections=2) as client:
        drainer = Drainer(
            client,
            spool,
            State(tmp_path),
            stop=threading.Event(),
            interval=1,
            parallel=2,
            policy=policy,
            ledger=ledger,
        )
        for _ in range(3):
            assert drainer.drain_once() is False
    assert len(spool.pending()) == 3
    assert ledger.retrying() == 0
    assert spool.stats().failed == 0


@pytest.mark.parametrize(
    ("value", "seconds"), [(90, 90), ("90", 90), ("90s", 90), ("30m", 1800), ("24h", 86400), ("2d", 172800)]
)
def test_give_up_after_is_seconds_or_a_number_with_a_unit(value, seconds):
    assert load_settings({**BASE, "give_up_after": value}, {}).give_up_after == seconds


@pytest.mark.parametrize("value", ["soon", "-5", "31d", "1.5h", True])
def test_a_wrong_give_up_after_is_explained(value):
    from agent.config import ConfigError

    with pytest.raises(ConfigError, match="give_up_after is seconds"):
        load_settings({**BASE, "give_up_after": value}, {})


def test_the_upload_bounds_come_from_the_upload_table(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(
        'server = "https://x.example.org"\n[upload]\nparallel = 8\nmax_attempts = 4\ngive_up_after = "2h"\n'
    )
    settings = load_settings({"config": config, "key": "k"}, {})
    assert (settings.parallel, settings.max_attempts, settings.give_up_after) == (8, 4, 7200)
    assert load_settings(BASE, {}).max_attempts == 10 and load_settings(BASE, {}).give_up_after == 86400


def test_files_go_up_several_at_a_time_the_oldest_started_first(tmp_path):
    from agent.send import Outcome, Result, upload_each

    files = [tmp_path / f"{n:04d}.dcm" for n in range(2000)]
    started: list = []
    # Four uploads must be under way together to pass the barrier: one at a time would break it.
    together = threading.Barrier(4, timeout=30)

    def upload(path):
        started.append(path)
        if len(started) <= 4:
            together.wait()
        return Outcome(path, Result.SENT)

    done = [path for path, _ in upload_each(files, parallel=4, upload=upload)]
    assert sorted(done) == files
    # Nothing past the first four can start before the barrier opens, so they are exactly the oldest.
    assert set(started[:4]) == set(files[:4])


def test_one_at_a_time_the_files_start_oldest_first(tmp_path):
    from agent.send import Outcome, Result, upload_each

    files = [tmp_path / f"{n:04d}.dcm" for n in range(200)]
    started: list = []

    def upload(path):
        started.append(path)
        return Outcome(path, Result.SENT)

    list(upload_each(files, parallel=1, upload=upload))
    # With several threads a descheduled one may note its start late, so order is checked on one.
    assert started == files
