"""`watch`: upload files dropped into an outbox folder, then move them to sent/ or failed/.

The uploading itself is agent.uploads.Drainer's, as for the spool.
"""

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent.spool import count_set_aside, free_name, set_aside

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

    label = "outbox"

    def __init__(self, folder: Path, settle: float, stat_folders: tuple[Path, ...] = ()) -> None:
        self.folder = folder
        self.sent = folder / SENT
        self.failed = folder / FAILED
        self.settle = settle
        self.stat_folders = tuple(folder / stat for stat in stat_folders)
        self._seen: dict[Path, _Seen] = {}

    def prepare(self) -> None:
        self.sent.mkdir(exist_ok=True)
        self.failed.mkdir(exist_ok=True)
        for folder in self.stat_folders:
            folder.mkdir(parents=True, exist_ok=True)

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
        # Stat folders' files first, each group oldest first (the sort is stable).
        return sorted(ready, key=lambda path: self.priority(path) != "stat")

    def priority(self, path: Path) -> str:
        return "stat" if any(path.is_relative_to(folder) for folder in self.stat_folders) else "routine"

    def keys_waiting(self) -> set[str]:
        return {self._key(path, seen) for path, seen in self._seen.items()}

    def key(self, path: Path) -> str:
        # With its size and time: a file replaced under the same name starts its count afresh.
        return self._key(path, self._seen[path])

    def _key(self, path: Path, seen: _Seen) -> str:
        return f"{path.relative_to(self.folder).as_posix()}|{seen.size}|{seen.mtime_ns}"

    def display(self, path: Path) -> str:
        return path.relative_to(self.folder).as_posix()

    def done(self, path: Path) -> Path:
        dest = free_name(self.sent / path.relative_to(self.folder))
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        return dest

    def set_aside(self, path: Path, reason: str) -> Path:
        dest = self.failed / path.relative_to(self.folder)
        return set_aside(path, dest.parent, reason)

    def counts(self) -> dict[str, int]:
        return {
            "pending": len(self.candidates()),
            "failed": count_set_aside(self.failed),
        }


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0
