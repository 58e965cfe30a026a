import httpx
import pytest

from agent import client
from agent.client import RETRY_CAP_SECONDS, backoff_delay, with_retries


@pytest.fixture(autouse=True)
def no_sleeping(monkeypatch):
    naps = []
    monkeypatch.setattr(client.time, "sleep", naps.append)
    return naps


def test_the_backoff_grows_and_is_capped():
    for attempt in range(12):
        delay = backoff_delay(attempt)
        assert 0.5 * min(RETRY_CAP_SECONDS, 0.5 * 2**attempt) <= delay <= min(RETRY_CAP_SECONDS, 0.5 * 2**attempt)
    assert backoff_delay(50, base=1.0, cap=30.0) <= 30.0


def test_it_retries_network_errors_until_the_operation_succeeds(no_sleeping):
    failures = [httpx.ConnectError("refused"), httpx.ReadTimeout("slow")]

    def operation():
        if failures:
            raise failures.pop(0)
        return "done"

    assert with_retries(operation, "test") == "done"
    assert len(no_sleeping) == 2


def test_it_gives_up_after_the_last_attempt(no_sleeping):
    calls = []

    def operation():
        calls.append(1)
        raise httpx.ConnectError("refused")

    with pytest.raises(httpx.ConnectError):
        with_retries(operation, "test", attempts=3)
    assert len(calls) == 3
    assert len(no_sleeping) == 2


def test_it_does_not_retry_other_errors(no_sleeping):
    def operation():
        raise ValueError("permanent")

    with pytest.raises(ValueError):
        with_retries(operation, "test")
    assert no_sleeping == []
