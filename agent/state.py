"""The agent's own small state: when each kind of sync last succeeded, for `status`."""

import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path

from agent.atomic import replace_json

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
            try:
                replace_json(self.path, data)
            except OSError as exc:
                # Only `status` reads it: never let it stop the transfers themselves.
                log.warning("cannot update %s: %s", self.path, exc)


def read_state(folder: Path) -> dict[str, str]:
    try:
        data = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
