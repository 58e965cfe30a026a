"""`watch`: upload files dropped into an outbox folder, then move them to sent/ or failed/."""

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from agent.client import backoff_delay
from agent.send import upload_file
from agent.spool import (
    IDLE_BACKOFF_BASE_SECONDS,
    IDLE_BACKOFF_CAP_SECONDS,
    Disposition,
    disposition,
    free_name,
    set_aside,
)
from agent.state import State

log = logging.getLogger(__name__)

SENT = "sent"
FAILED = "failed"


@dataclass(frozen=True)
class _Seen:
    size: int
    mtime_ns: int


class Outbox:
    """The outbox folder; a file is taken only once it has stopped changing.

    A copy still in progress keeps changing size or modification time, so a file is
    ready only when it looked the same at the previous scan and was last written at
    least `settle` seconds ago.
    """

    def __init__(self, folder: Path, settle: float) -> None:
        self.folder = folder
        self.sent = folder / SENT
        self.failed = folder / FAILED
        self.settle = settle
        self._seen: dict[Path, _Seen] = {}

    def prepare(self) -> None:
        self.sent.mkdir(exist_ok=True)
        self.failed.mkdir(exist_ok=True)

    def candidates(self) -> list[Path]:
        """Every file waiting in the outbox (sub-folders too), oldest first."""
        found = []
        for root, dirs, names in os.walk(self.folder):
            here = Path(root)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d) not in (self.sent, self.failed))
            found.extend(here / name for name in names if not name.startswith("."))
        return sorted(found, key=_mtime)

    def ready(self) -> list[Path]:
        """The files that have not changed since the previous scan and for at least `settle` seconds."""
        now = time.time_ns()
        seen: dict[Path, _Seen] = {}
        ready = []
        for path in self.candidates():
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            current = _Seen(info.st_size, info.st_mtime_ns)
            seen[path] = current
            if self._seen.get(path) == current and now - current.mtime_ns >= self.settle * 1e9:
                ready.append(path)
        self._seen = seen
        return ready

    def sent_away(self, path: Path) -> Path:
        dest = free_name(self.sent / path.relative_to(self.folder))
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        return dest

    def failed_away(self, path: Path, reason: str) -> Path:
        dest = self.failed / path.relative_to(self.folder)
        return set_aside(path, dest.parent, reason)

    def counts(self) -> dict[str, int]:
        return {
            "pending": len(self.candidates()),
            "failed": sum(1 for p in self.failed.rglob("*") if p.is_file() and p.suffix != ".reason"),
        }


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


class OutboxWatcher:
    """Scans the outbox every `interval` seconds for as long as the agent runs."""

    def __init__(
        self, client: httpx.Client, outbox: Outbox, state: State, *, stop: threading.Event, interval: float
    ) -> None:
        self.client = client
        self.outbox = outbox
        self.state = state
        self.stop = stop
        self.interval = interval
        self.busy = threading.Lock()

    def run(self) -> None:
        trouble = 0
        while not self.stop.is_set():
            try:
                ok = self.scan_once()
            except OSError as exc:
                log.error("outbox %s: %s", self.outbox.folder, exc)
                ok = False
            trouble = 0 if ok else trouble + 1
            delay = (
                self.interval
                if ok
                else max(self.interval, backoff_delay(trouble - 1, IDLE_BACKOFF_BASE_SECONDS, IDLE_BACKOFF_CAP_SECONDS))
            )
            self.stop.wait(delay)

    def scan_once(self) -> bool:
        """Upload the ready files; False when the portal could not take them now."""
        for path in self.outbox.ready():
            if self.stop.is_set():
                return True
            with self.busy:
                outcome = upload_file(self.client, path)
                what = disposition(outcome)
                if what is Disposition.DONE:
                    dest = self.outbox.sent_away(path)
                    self.state.record("upload")
                    log.info(
                        "outbox: %s uploaded: %s (%s), moved to %s", path, outcome.detail, outcome.result.value, dest
                    )
                elif what is Disposition.REFUSED:
                    dest = self.outbox.failed_away(path, outcome.detail)
                    log.error("outbox: %s refused, moved to %s: %s", path, dest, outcome.detail)
                else:
                    log.warning("outbox: %s left for later: %s", path, outcome.detail)
                    return False
        return True
