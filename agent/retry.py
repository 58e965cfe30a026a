"""Each file's own failures: how often it failed, since when, and when to try it again.

The record is kept in the state folder so that a restart neither resets a file's backoff
nor its count toward being set aside.
"""

import hashlib
import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.atomic import replace_json
from agent.client import backoff_delay

log = logging.getLogger(__name__)

# The first retry of a failed file; the delay doubles from there.
FIRST_RETRY_SECONDS = 5.0
# A file's retries are never closer than this, however small the bounds.
SHORTEST_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class RetryPolicy:
    """When a file that keeps failing is set aside: after `max_attempts` failed attempts AND `give_up_after` seconds.

    Both must hold, so a file is never given up faster than the time bound, however fast
    its attempts fail. Its retries start FIRST_RETRY_SECONDS apart and double, but never
    grow past give_up_after / max_attempts, so the attempts spread over the time bound.
    """

    max_attempts: int
    give_up_after: float

    @property
    def longest_delay(self) -> float:
        return max(SHORTEST_RETRY_SECONDS, self.give_up_after / self.max_attempts)

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the file's `attempts`-th failure."""
        cap = self.longest_delay
        return max(SHORTEST_RETRY_SECONDS, backoff_delay(attempts - 1, base=min(FIRST_RETRY_SECONDS, cap), cap=cap))

    def exhausted(self, failure: "Failure", now: float) -> bool:
        return failure.attempts >= self.max_attempts and now - failure.first_failed >= self.give_up_after


@dataclass(frozen=True)
class Failure:
    attempts: int
    first_failed: float  # wall-clock seconds, so they survive a restart
    last_failed: float
    next_try: float
    last_error: str


class Ledger:
    """The failures of the files still waiting, by key, saved as JSON after every change.

    Only failures that were the file's own are recorded here (see agent.uploads.verdict);
    while the portal is down for everyone nothing is.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._failures = read_ledger(path) if path is not None else {}

    def due(self, key: str, now: float) -> bool:
        failure = self._failures.get(key)
        return failure is None or failure.next_try <= now

    def record(self, key: str, error: str, policy: RetryPolicy, now: float) -> Failure:
        """Count one failed attempt of `key` and schedule its next one."""
        with self._lock:
            before = self._failures.get(key)
            attempts = (before.attempts if before else 0) + 1
            failure = Failure(
                attempts=attempts,
                first_failed=before.first_failed if before else now,
                last_failed=now,
                next_try=now + policy.delay(attempts),
                last_error=error,
            )
            self._failures[key] = failure
            self._save()
        return failure

    def forget(self, key: str) -> None:
        with self._lock:
            if self._failures.pop(key, None) is not None:
                self._save()

    def keep_only(self, keys: set[str]) -> None:
        """Drop the records of files no longer waiting (removed by hand, or changed since)."""
        with self._lock:
            gone = set(self._failures) - keys
            for key in gone:
                del self._failures[key]
            if gone:
                self._save()

    def retrying(self) -> int:
        return len(self._failures)

    def next_try(self) -> float | None:
        """The earliest time a failed file is due again, if any is waiting."""
        return min((f.next_try for f in self._failures.values()), default=None)

    def _save(self) -> None:
        if self.path is None:
            return
        data = {key: asdict(failure) for key, failure in self._failures.items()}
        try:
            replace_json(self.path, data)
        except OSError as exc:
            # The record only paces retries; the files themselves are safe where they are.
            log.warning("cannot update %s: %s; retry counts will restart with the agent", self.path, exc)


def read_ledger(path: Path) -> dict[str, Failure]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s); starting the retry counts afresh", path, exc)
        return {}
    failures = {}
    for key, entry in data.items() if isinstance(data, dict) else ():
        try:
            failures[key] = Failure(**entry)
        except TypeError:
            continue
    return failures


def ledger_path(state_dir: Path, kind: str, folder: Path) -> Path:
    """The record for one queue ("spool" or "outbox") at `folder`: one file per folder, so agents never share one."""
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    return state_dir / f"retries-{kind}-{digest}.json"
