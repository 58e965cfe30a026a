"""The heartbeat: tells the portal this agent is alive, which version runs where, and how full its spool is."""

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import httpx

from agent import __version__
from agent.client import RetryableStatus, check_retryable, describe, error_reason
from agent.state import State

log = logging.getLogger(__name__)

PATH = "/api/v1/agents/heartbeat"


def heartbeat_send(client: httpx.Client, payload: dict[str, Any]) -> None:
    """POST one heartbeat; raises httpx.HTTPError, RetryableStatus or HeartbeatRefused."""
    response = check_retryable(client.post(PATH, json=payload))
    if response.status_code != 200:
        raise HeartbeatRefused(error_reason(response))


class HeartbeatRefused(Exception):
    """The portal answered, but not with OK (a revoked key, an older portal)."""


def base_payload(roles: list[str], interval: int) -> dict[str, Any]:
    return {"version": __version__, "hostname": socket.gethostname(), "roles": roles, "interval": interval}


class Heartbeat:
    """Sends a heartbeat at start and every `interval` seconds until `stop` is set."""

    def __init__(
        self,
        client: httpx.Client,
        *,
        roles: list[str],
        interval: int,
        sizes: Callable[[], dict[str, Any]],
        state: State,
        stop: threading.Event,
    ) -> None:
        self.client = client
        self.roles = roles
        self.interval = interval
        self.sizes = sizes
        self.state = state
        self.stop = stop
        self.busy = threading.Lock()
        self._failing = False

    def run(self) -> None:
        while not self.stop.is_set():
            self.beat()
            self.stop.wait(self.interval)

    def beat(self) -> bool:
        try:
            payload = {**base_payload(self.roles, self.interval), **self.sizes()}
            heartbeat_send(self.client, payload)
        except (httpx.HTTPError, RetryableStatus, HeartbeatRefused, OSError) as exc:
            # Once per outage, not every minute of it.
            if not self._failing:
                log.warning("heartbeat not delivered: %s", describe(exc))
            self._failing = True
            return False
        if self._failing:
            log.info("heartbeat delivered again")
        self._failing = False
        self.state.record("heartbeat")
        return True
