"""The agent's own small state: when each kind of sync last succeeded, for `status`."""

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


class State:
    """state.json in the state folder; with no folder nothing is recorded (a one-off command)."""

    def __init__(self, folder: Path | None) -> None:
        self.path = folder / STATE_FILE if folder is not None else None
        self._lock = threading.Lock()

    def record(self, event: str) -> None:
        """Note that `event` ("upload", "receive", "heartbeat") just succeeded."""
        if self.path is None:
            return
        with self._lock:
            data = read_state(self.path.parent)
            data[event] = datetime.now(UTC).isoformat(timespec="seconds")
            tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                os.replace(tmp, self.path)
            except OSError as exc:
                # Only `status` reads it: never let it stop the transfers themselves.
                log.warning("cannot update %s: %s", self.path, exc)


def read_state(folder: Path) -> dict[str, str]:
    try:
        data = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
