"""`python -m portal.serve`: each worker listens on a socket of its own, so connections spread over them."""

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.integration.stack import PYTHON, free_port, wait_for

pytestmark = pytest.mark.integration
WORKERS = 4


def _workers(pid: int) -> set[int]:
    """The supervisor's worker processes (multiprocessing's resource tracker left out)."""
    workers = set()
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.add(int(child))
        except FileNotFoundError:
            continue  # it ended while being listed
    return workers


def _holders(port: int) -> list[int]:
    """The pid holding each established connection to `port` (ss -p)."""
    listing = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    return [int(pid) for pid in re.findall(r"pid=(\d+)", listing)]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def portal(postgres_stack):
    port = free_port()
    process = postgres_stack.spawn(
        "serve", [PYTHON, "-m", "portal.serve", "--port", str(port), "--workers", str(WORKERS), "--log-level", "info"]
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _healthy(url) and len(_workers(process.popen.pid)) == WORKERS, what="portal.serve's workers")
    yield process, port, url
    process.stop()


def test_connections_opened_at_once_spread_over_every_worker(portal):
    process, port, _ = portal
    workers = _workers(process.popen.pid)
    # A burst, as an agent's download threads or wrk open them: from one shared socket, the
    # worker that wakes first takes nearly all.
    connections = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(40)]
    try:
        for connection in connections:
            connection.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for connection in connections:
            assert connection.recv(64).startswith(b"HTTP/1.1 200")
        held = _holders(port)
        counts = sorted((held.count(pid) for pid in workers), reverse=True)
        assert sum(counts) == 40
        # Hashed over 4 sockets, 40 connections leave one with none or with 22 or more about
        # once in 10,000 runs.
        assert counts[-1] > 0 and counts[0] < 22
    finally:
        for connection in connections:
            connection.close()


def test_a_worker_that_dies_is_replaced(portal):
    process, _, url = portal
    victim = min(_workers(process.popen.pid))
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: victim not in _workers(process.popen.pid) and len(_workers(process.popen.pid)) == WORKERS,
        what="a new worker",
    )
    assert _healthy(url)


def test_sigterm_stops_every_worker(portal):
    process, _, _ = portal
    workers = _workers(process.popen.pid)
    process.popen.send_signal(signal.SIGTERM)
    assert process.popen.wait(timeout=60) == 0
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
