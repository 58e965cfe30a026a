"""The durable spool between the DICOM listener and the portal, and the upload loop that drains it.

An instance is accepted from a modality only once it is fsynced here, so the spool is
what makes "success" to the modality mean "will reach the portal": it is emptied oldest
first, and an instance leaves it only when the portal has it or refused it for good.
"""

import enum
import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from agent.atomic import remove_partials, write_durable
from agent.client import backoff_delay
from agent.paths import safe_component
from agent.send import Outcome, Result, upload_file
from agent.state import State

log = logging.getLogger(__name__)

FAILED = "failed"
LOCK = ".lock"
# The portal's answers that no retry will change: bad file, other bytes under the same UID, too large, not DICOM.
PERMANENT_STATUSES = {400, 409, 413, 415}
IDLE_BACKOFF_BASE_SECONDS = 1.0
IDLE_BACKOFF_CAP_SECONDS = 30.0


class Disposition(enum.Enum):
    DONE = "done"
    REFUSED = "refused"  # permanently: set aside with the reason
    LATER = "later"  # portal unreachable, busy or refusing the key: keep and try again


def disposition(outcome: Outcome) -> Disposition:
    """What an upload outcome means for the file that was uploaded."""
    if outcome.result in (Result.SENT, Result.ALREADY_PRESENT):
        return Disposition.DONE
    if outcome.result is Result.SKIPPED or outcome.status_code in PERMANENT_STATUSES:
        return Disposition.REFUSED
    return Disposition.LATER


@dataclass(frozen=True)
class SpoolStats:
    count: int
    bytes: int
    failed: int


class SpoolBusy(Exception):
    """Another agent process already drains this spool."""


class Spool:
    """A folder of instances waiting for upload, named so that sorting them is oldest first."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.failed = folder / FAILED
        self.failed.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None

    def claim(self) -> None:
        """Become the one process that writes and drains this spool, and drop what a killed one left half-written."""
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(f"another agent process is using the spool {self.folder}") from None
        self._lock_fd = fd  # held until the process ends; the kernel releases it even after SIGKILL
        for path in remove_partials(self.folder):
            log.warning("removed %s, left half-written by an earlier run (never acknowledged to its sender)", path)

    def put(self, data: bytes, sop_instance_uid: str) -> Path:
        """Store one instance durably (file and folder fsynced); raises OSError when the disk refuses."""
        name = f"{time.time_ns():020d}-{safe_component(sop_instance_uid)}.dcm"
        path = self.folder / name
        write_durable(path, [data])
        return path

    def pending(self) -> list[Path]:
        """The spooled files, oldest first."""
        return sorted(p for p in self.folder.iterdir() if p.suffix == ".dcm" and not p.name.startswith("."))

    def done(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def refuse(self, path: Path, reason: str) -> Path:
        """Move a file the portal refused for good to failed/, with a .reason file beside it."""
        return set_aside(path, self.failed, reason)

    def stats(self) -> SpoolStats:
        files = self.pending()
        size = sum(_size(p) for p in files)
        failed = sum(1 for p in self.failed.iterdir() if p.suffix == ".dcm")
        return SpoolStats(len(files), size, failed)


def set_aside(path: Path, folder: Path, reason: str) -> Path:
    """Move `path` into `folder` under a free name and write `<name>.reason` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = free_name(folder / path.name)
    (dest.parent / f"{dest.name}.reason").write_text(reason.rstrip() + "\n")
    os.replace(path, dest)
    return dest


def free_name(dest: Path) -> Path:
    """`dest`, or `name.1.ext`, `name.2.ext`... when taken: a file set aside never replaces another."""
    candidate, number = dest, 0
    while candidate.exists():
        number += 1
        candidate = dest.with_name(f"{dest.stem}.{number}{dest.suffix}")
    return candidate


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # uploaded and removed meanwhile
        return 0


class SpoolDrainer:
    """Uploads the spool, oldest first, for as long as the agent runs."""

    def __init__(
        self, client: httpx.Client, spool: Spool, state: State, *, stop: threading.Event, interval: float
    ) -> None:
        self.client = client
        self.spool = spool
        self.state = state
        self.stop = stop
        self.interval = interval
        self.wake = threading.Event()  # set by the listener when it spools something
        self.busy = threading.Lock()  # held during an upload, so shutdown can let it finish

    def run(self) -> None:
        trouble = 0
        while not self.stop.is_set():
            self.wake.clear()
            if self.drain_once():
                trouble = 0
                self.wake.wait(self.interval)
            else:
                trouble += 1
                delay = backoff_delay(trouble - 1, IDLE_BACKOFF_BASE_SECONDS, IDLE_BACKOFF_CAP_SECONDS)
                log.info("spool: %d waiting; trying the portal again in %.1f s", len(self.spool.pending()), delay)
                self.stop.wait(delay)

    def drain_once(self) -> bool:
        """Upload what is spooled; False when the portal could not take it now."""
        for path in self.spool.pending():
            if self.stop.is_set():
                return True
            with self.busy:
                outcome = upload_file(self.client, path)
                what = disposition(outcome)
                if what is Disposition.DONE:
                    self.spool.done(path)
                    self.state.record("upload")
                    log.info("spool: %s uploaded: %s (%s)", path.name, outcome.detail, outcome.result.value)
                elif what is Disposition.REFUSED:
                    where = self.spool.refuse(path, outcome.detail)
                    log.error("spool: %s refused by the portal, moved to %s: %s", path.name, where, outcome.detail)
                else:
                    log.warning("spool: %s kept for later: %s", path.name, outcome.detail)
                    return False
        return True
