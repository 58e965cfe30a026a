"""The upload loop of the `scp` spool and `watch`: several files at a time, oldest first, none behind another.

A file that fails is retried on its own backoff while the others go on, and is set aside
in failed/ once it has failed often enough for long enough (agent.retry.RetryPolicy).
Whose fault a failure is decides whether it counts (see `verdict`): a portal that is down
for everyone makes every file wait, but counts against none of them.
"""

import enum
import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import httpx

from agent import batches
from agent.client import backoff_delay
from agent.retry import Failure, Ledger, RetryPolicy
from agent.send import Outcome, Result, upload_each
from agent.state import State

log = logging.getLogger(__name__)

HEALTH_PATH = "/api/v1/health"
# One health check answers for every failure within this many seconds.
HEALTH_MAX_AGE_SECONDS = 5.0
# The portal's answers that no retry will change: bad file, other bytes under the same UID, too large, not DICOM.
PERMANENT_STATUSES = {400, 409, 413, 415}
# Answers about the portal or the key, never about the file: a paused portal (503, with
# Retry-After), a refused key, a rate limit still in force at shutdown. A 502 or 504 is
# the proxy's word for an upstream that failed on this request: behind nginx, a file that
# kills its web process gets one every time, so those go to the health check as a 500 does.
NOT_THE_FILES_FAULT = {401, 403, 429, 503}
IDLE_BACKOFF_BASE_SECONDS = 1.0
IDLE_BACKOFF_CAP_SECONDS = 30.0


class Verdict(enum.Enum):
    DONE = "done"  # the portal has it
    REFUSED = "refused"  # refused for good: set aside now
    RETRY = "retry"  # the file failed while the portal works: counted, retried on its own backoff
    OUTAGE = "outage"  # the portal is down, busy or refuses the key: nothing counted, every file waits
    GONE = "gone"  # the file disappeared meanwhile


def verdict(outcome: Outcome, portal_up: "PortalProbe") -> Verdict:
    """What an upload outcome means for the file, and whether it is the file's own failure.

    A 500, 502 or 504, or a connection that broke during the upload, is the file's failure
    only when the portal otherwise works: it answers its health check. A failed connection to a
    portal that does not is an outage, and so is anything in NOT_THE_FILES_FAULT.
    """
    if outcome.result in (Result.SENT, Result.ALREADY_PRESENT):
        return Verdict.DONE
    if outcome.result is Result.SKIPPED or outcome.status_code in PERMANENT_STATUSES:
        return Verdict.REFUSED
    if outcome.status_code in NOT_THE_FILES_FAULT:
        return Verdict.OUTAGE
    if outcome.missing:
        return Verdict.GONE
    if outcome.status_code is None and not outcome.network:
        return Verdict.RETRY  # it could not be read here; the portal played no part
    return Verdict.RETRY if portal_up() else Verdict.OUTAGE


class PortalProbe:
    """Whether the portal answers its health check (which includes its database), asked at most every few seconds."""

    def __init__(self, client: httpx.Client, max_age: float = HEALTH_MAX_AGE_SECONDS) -> None:
        self.client = client
        self.max_age = max_age
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._up = False

    def __call__(self) -> bool:
        with self._lock:
            if time.monotonic() - self._checked >= self.max_age:
                try:
                    self._up = self.client.get(HEALTH_PATH, timeout=10).status_code == 200
                except httpx.HTTPError:
                    self._up = False
                self._checked = time.monotonic()
            return self._up


class FileQueue(Protocol):
    """A folder of files to upload: the spool (agent.spool.Spool) or the outbox (agent.watch.Outbox)."""

    label: str

    def ready(self) -> list[Path]:
        """The files to upload now, oldest first."""

    def keys_waiting(self) -> set[str]:
        """The keys of every file still waiting, as of the last `ready()`."""

    def key(self, path: Path) -> str:
        """What names this file (in this version) in the retry record."""

    def display(self, path: Path) -> str:
        """The file's name in log lines."""

    def done(self, path: Path) -> Path | None:
        """The portal has it: remove it or move it to sent/; where it went, if anywhere."""

    def set_aside(self, path: Path, reason: str) -> Path:
        """Move it to failed/ with a .reason file."""

    def priority(self, path: Path) -> str:
        """The priority the portal is asked for: "stat" or "routine"."""


class Drainer:
    """Uploads one queue for as long as the agent runs."""

    def __init__(
        self,
        client: httpx.Client,
        queue: FileQueue,
        state: State,
        *,
        stop: threading.Event,
        interval: float,
        parallel: int,
        policy: RetryPolicy,
        ledger: Ledger,
    ) -> None:
        self.client = client
        self.queue = queue
        self.state = state
        self.stop = stop
        self.interval = interval
        self.parallel = parallel
        self.policy = policy
        self.ledger = ledger
        self.portal_up = PortalProbe(client)
        self.wake = threading.Event()  # set by the listener when it spools something
        self.busy = threading.Lock()  # held during a pass, so shutdown can let the uploads under way finish

    def run(self) -> None:
        trouble = 0
        while not self.stop.is_set():
            self.wake.clear()
            try:
                ok = self.drain_once()
            except OSError as exc:
                log.error("%s: %s", self.queue.label, exc)
                ok = False
            if ok:
                trouble = 0
                self.wake.wait(self._idle_seconds())
                continue
            trouble += 1
            delay = backoff_delay(trouble - 1, IDLE_BACKOFF_BASE_SECONDS, IDLE_BACKOFF_CAP_SECONDS)
            log.info("%s: the portal cannot take files now; trying again in %.1f s", self.queue.label, delay)
            self.stop.wait(delay)

    def _idle_seconds(self) -> float:
        """Until the next scan, or sooner when a failed file is due again."""
        due = self.ledger.next_try()
        if due is None:
            return self.interval
        return min(self.interval, max(0.1, due - time.time()))

    def drain_once(self) -> bool:
        """Upload every file that is due, `parallel` at a time; False when the portal could not take them now."""
        with self.busy:
            files = self.queue.ready()
            self.ledger.keep_only(self.queue.keys_waiting())
            now = time.time()
            keys = {path: self.queue.key(path) for path in files}
            due = [path for path in files if self.ledger.due(keys[path], now)]
            outage = threading.Event()

            def upload(group: list[Path]) -> list[Outcome] | None:
                # Once the portal is known to be down, the files not yet started wait for the next pass.
                if outage.is_set() or self.stop.is_set():
                    return None
                # A batch is cut from files of one priority (below), so its first file's is every file's.
                return batches.upload_batch(self.client, group, stop=self.stop, priority=self.queue.priority(group[0]))

            size = batches.batch_size(len(due), self.parallel)
            # Stat files are ready first; a batch never mixes them with routine ones.
            by_priority: dict[str, list[Path]] = {}
            for path in due:
                by_priority.setdefault(self.queue.priority(path), []).append(path)
            groups = [group for files in by_priority.values() for group in batches.batches(files, max_files=size)]
            for group, outcomes in upload_each(groups, parallel=self.parallel, upload=upload):
                verdicts = [self._settle(p, keys[p], outcome) for p, outcome in zip(group, outcomes, strict=True)]
                if Verdict.OUTAGE in verdicts:
                    outage.set()
                # Once a batch, not once a file: it rewrites state.json, and only `status` reads it.
                if Verdict.DONE in verdicts:
                    self.state.record("upload")
            return not outage.is_set()

    def _settle(self, path: Path, key: str, outcome: Outcome) -> Verdict:
        label, name = self.queue.label, self.queue.display(path)
        what = verdict(outcome, self.portal_up)
        if what is Verdict.DONE:
            dest = self.queue.done(path)
            self.ledger.forget(key)
            moved = f", moved to {dest}" if dest else ""
            log.info("%s: %s uploaded: %s (%s)%s", label, name, outcome.detail, outcome.result.value, moved)
        elif what is Verdict.REFUSED:
            dest = self.queue.set_aside(path, outcome.detail)
            self.ledger.forget(key)
            log.error("%s: %s refused by the portal, moved to %s: %s", label, name, dest, outcome.detail)
        elif what is Verdict.GONE:
            self.ledger.forget(key)
            log.warning("%s: %s disappeared before it was uploaded", label, name)
        elif what is Verdict.OUTAGE:
            log.warning("%s: %s kept for later: %s", label, name, outcome.detail)
        else:
            self._failed(path, key, outcome)
        return what

    def _failed(self, path: Path, key: str, outcome: Outcome) -> None:
        now = time.time()
        failure = self.ledger.record(key, outcome.detail, self.policy, now)
        label, name = self.queue.label, self.queue.display(path)
        if self.policy.exhausted(failure, now):
            dest = self.queue.set_aside(path, gave_up_reason(failure))
            self.ledger.forget(key)
            log.error(
                "%s: %s failed %d times over %s, set aside in %s: %s",
                label,
                name,
                failure.attempts,
                _duration(now - failure.first_failed),
                dest,
                outcome.detail,
            )
            return
        log.warning(
            "%s: %s failed (attempt %d; set aside after %d and %s): %s; retrying it in %.0f s, the other files go on",
            label,
            name,
            failure.attempts,
            self.policy.max_attempts,
            _duration(self.policy.give_up_after),
            outcome.detail,
            failure.next_try - now,
        )


def gave_up_reason(failure: Failure) -> str:
    """The .reason text of a file set aside after repeated failures: the last error, then the attempts."""
    first = datetime.fromtimestamp(failure.first_failed, UTC).isoformat(timespec="seconds")
    last = datetime.fromtimestamp(failure.last_failed, UTC).isoformat(timespec="seconds")
    return (
        f"{failure.last_error}\n"
        f"gave up after {failure.attempts} failed attempts over {_duration(failure.last_failed - failure.first_failed)}"
        f" (first {first}, last {last}) while the portal took other files\n"
    )


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
