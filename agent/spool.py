"""The durable spool between the DICOM listener and the portal.

An instance is accepted from a modality only once it is fsynced here, so the spool is
what makes "success" to the modality mean "will reach the portal": it is uploaded oldest
first (agent.uploads.Drainer), and an instance leaves it only when the portal has it, or
is set aside in failed/ when the portal refused it for good or it kept failing.

A stat instance (from a calling AE title configured as stat) is spooled in stat/, which
is how the spool remembers its priority across restarts; stat/ is uploaded first.
"""

import fcntl
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.atomic import remove_partials, write_durable
from agent.paths import safe_component

log = logging.getLogger(__name__)

FAILED = "failed"
STAT = "stat"
LOCK = ".lock"
REASON = ".reason"


@dataclass(frozen=True)
class SpoolStats:
    count: int
    bytes: int
    failed: int


class SpoolBusy(Exception):
    """Another agent process already drains this spool."""


class Spool:
    """A folder of instances waiting for upload, named so that sorting them is oldest first."""

    label = "spool"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.failed = folder / FAILED
        self.stat = folder / STAT
        self.failed.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None
        self._waiting: list[Path] = []

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

    def put(self, data: bytes, sop_instance_uid: str, *, stat: bool = False) -> Path:
        """Store one instance durably (file and folder fsynced); raises OSError when the disk refuses."""
        name = f"{time.time_ns():020d}-{safe_component(sop_instance_uid)}.dcm"
        path = (self.stat if stat else self.folder) / name
        write_durable(path, [data])
        return path

    def pending(self) -> list[Path]:
        """The spooled files: the stat ones, then the others, each oldest first."""
        # stat/ is made by the first stat put, durably (write_durable syncs the folder it creates).
        stat = sorted(p for p in self.stat.iterdir() if _spooled(p)) if self.stat.is_dir() else []
        return [*stat, *sorted(p for p in self.folder.iterdir() if _spooled(p))]

    def priority(self, path: Path) -> str:
        return "stat" if path.parent == self.stat else "routine"

    def ready(self) -> list[Path]:
        self._waiting = self.pending()
        return self._waiting

    def keys_waiting(self) -> set[str]:
        return {path.name for path in self._waiting}

    def key(self, path: Path) -> str:
        # Spool names are unique and never reused (a timestamp and the SOP Instance UID).
        return path.name

    def display(self, path: Path) -> str:
        return path.name

    def done(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def set_aside(self, path: Path, reason: str) -> Path:
        """Move a file to failed/, with a .reason file beside it."""
        return set_aside(path, self.failed, reason)

    def stats(self) -> SpoolStats:
        files = self.pending()
        size = sum(_size(p) for p in files)
        return SpoolStats(len(files), size, count_set_aside(self.failed))


def _spooled(path: Path) -> bool:
    return path.suffix == ".dcm" and not path.name.startswith(".")


def set_aside(path: Path, folder: Path, reason: str) -> Path:
    """Move `path` into `folder` under a free name and write `<name>.reason` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = free_name(folder / path.name)
    (dest.parent / f"{dest.name}{REASON}").write_text(reason.rstrip() + "\n")
    os.replace(path, dest)
    return dest


def count_set_aside(folder: Path) -> int:
    """Files set aside under `folder` (sub-folders too), each with its .reason."""
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.rglob("*") if p.suffix != REASON and p.is_file())


def last_set_aside(folders: list[Path]) -> datetime | None:
    """When the newest file was set aside in any of `folders`: its .reason file is written then."""
    times = [p.stat().st_mtime for folder in folders if folder.is_dir() for p in folder.rglob(f"*{REASON}")]
    return datetime.fromtimestamp(max(times), UTC) if times else None


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
