"""The real stack for integration tests: database, server, worker and agent processes.

Everything runs as separate processes, exactly as deployed: `manage.py` for
set-up, uvicorn for the portal, a Celery worker (with beat) on RabbitMQ, and
the site agent's own command line.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BIN = Path(PYTHON).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Generous: on a machine busy with other work, a fan-out or a lease round can take tens of
# seconds; a healthy stack still passes at once, only a broken one waits this long.
WAIT_SECONDS = 90


def wait_for(
    condition: Callable[[], object], *, timeout: float = WAIT_SECONDS, interval: float = 0.2, what: str = "condition"
):
    """Poll `condition` until it returns something true, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        # Checked after the condition, so a starved loop still looks once at the deadline.
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Process:
    """A child process whose output goes to a log file, shown when a test fails."""

    def __init__(self, name: str, args: list[str], env: dict, log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Signal the process's group, and return once every process of it is gone (SIGKILL after `timeout`).

        The group may outlive its leader: a shell that dies at once leaves the command it
        ran finishing its work.
        """
        self.signal(sig)
        self.wait(timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def wait(self, timeout: float = 15) -> None:
        """Return once every process of the group is gone, killing what is left after `timeout`."""
        deadline = time.monotonic() + timeout
        while (self.popen.poll() is None or self._group_alive()) and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._group_alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        self._log.close()

    def _group_alive(self) -> bool:
        """Whether a process of the group still runs.

        One that has exited counts as gone: orphaned, it stays a zombie until this machine's
        init reaps it, which took up to 3 s here, and signal 0 still reaches a zombie.
        """
        try:
            os.killpg(self.popen.pid, 0)
        except ProcessLookupError:
            return False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(os.path.join(entry.path, "stat")) as stat:
                    text = stat.read()
            except OSError:
                continue  # gone meanwhile
            # After "(comm)": state, ppid, pgrp, ...; comm itself may hold spaces and parentheses.
            state, _, group = text[text.rindex(")") + 2 :].split(maxsplit=3)[:3]
            if int(group) == self.popen.pid and state not in ("Z", "X"):
                return True
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Stack:
    """One portal installation: its environment, its processes, and helpers to drive it."""

    def __init__(self, *, tmp: Path, env: dict, with_worker: bool) -> None:
        self.tmp = tmp
        self.env = env
        self.with_worker = with_worker
        self.processes: list[Process] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    # -- set-up ---------------------------------------------------------------
    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [PYTHON, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise AssertionError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def start(self) -> None:
        self.manage("migrate", "--no-input", "-v0")
        self.server = self.start_server()
        if self.with_worker:
            self.start_worker()
            self.start_stat_worker()
        else:
            self.spawn("periodic", [PYTHON, "manage.py", "run_periodic"])

    def start_worker(self, *, concurrency: int = 2, node: str | None = None, env: dict | None = None) -> Process:
        """A Celery worker that also runs beat (the sweep and lease expiry), logging each task."""
        return self.spawn(
            "worker",
            [
                str(BIN / "celery"),
                "-A",
                "portal",
                "worker",
                "-B",
                "--loglevel=INFO",
                f"--concurrency={concurrency}",
                "--without-gossip",
                "--without-mingle",
                # A node name of its own: two workers named celery@<host> on one broker
                # fight over the broker's exclusive pidbox queue, and one of them dies.
                "-n",
                f"{node or 'dx-' + uuid.uuid4().hex[:8]}@%h",
                "-s",
                str(self.tmp / "beat-schedule"),
            ],
            env=env,
        )

    def start_stat_worker(self, *, concurrency: int = 1, env: dict | None = None) -> Process:
        """A worker of the stat queue alone, as deploy/systemd/dicom-exchange-stat-worker.service runs one."""
        queue = stat_queue(env or self.env)
        return self.spawn(
            "stat-worker",
            [
                str(BIN / "celery"),
                "-A",
                "portal",
                "worker",
                "-Q",
                queue,
                "--loglevel=INFO",
                f"--concurrency={concurrency}",
                "--without-gossip",
                "--without-mingle",
                "-n",
                f"{queue}-{uuid.uuid4().hex[:4]}@%h",
            ],
            env=env,
        )

    def start_server(self, *, port: int | None = None, env: dict | None = None, name: str = "server") -> Process:
        port = port or self.port
        process = self.spawn(
            name,
            [
                str(BIN / "uvicorn"),
                "portal.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "2",
                "--no-access-log",
            ],
            env=env,
        )
        wait_for(lambda: self._healthy(port), what=f"the portal on port {port}")
        return process

    def _healthy(self, port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def spawn(self, name: str, args: list[str], env: dict | None = None) -> Process:
        process = Process(name, args, env or self.env, self.tmp)
        self.processes.append(process)
        return process

    def load_network(self, text: str) -> None:
        path = self.tmp / f"network-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(text)
        self.manage("load_network", str(path))

    def issue_key(self, center: str) -> str:
        return self.manage("issue_key", center).stdout.strip()

    def stop(self) -> None:
        # All signalled first, so each shuts down beside the others instead of after them.
        for process in reversed(self.processes):
            process.signal()
        for process in reversed(self.processes):
            process.wait()

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.log()[-6000:]}" for p in self.processes)

    # -- the site agent -------------------------------------------------------
    def agent(self, key: str, *args: str, timeout: float = 120, server: str | None = None):
        return subprocess.run(
            [PYTHON, "-m", "agent", "--server", server or self.url, "--key", key, *args],
            cwd=ROOT,
            env={**self.env, "TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def agent_process(self, key: str, *args: str, name: str = "agent") -> Process:
        return self.spawn(name, [PYTHON, "-m", "agent", "--server", self.url, "--key", key, *args])

    def sql(self, query: str, *params) -> list[tuple]:
        """Read the portal's database directly, as an administrator would."""
        url = self.env["DATABASE_URL"]
        if url.startswith("sqlite"):
            import sqlite3

            with sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30) as connection:
                return connection.execute(query.replace("%s", "?"), params).fetchall()
        import psycopg

        with psycopg.connect(url) as connection:
            return connection.execute(query, params).fetchall()


def stat_queue(env: dict) -> str:
    """The stat queue of a portal with this environment (portal/settings.py CELERY_STAT_QUEUE)."""
    return env.get("CELERY_STAT_QUEUE") or f"{env.get('CELERY_QUEUE') or 'dicom-exchange'}-stat"


def base_env(tmp: Path) -> dict:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "CELERY_", "DJANGO_", "PORTAL_", "EXCHANGE_"))
    }
    env.update(
        {
            "PORTAL_VAR_DIR": str(tmp / "var"),
            "DICOM_STORAGE_DIR": str(tmp / "storage"),
            "SWEEP_INTERVAL_SECONDS": "1",
            "SWEEP_GRACE_SECONDS": "2",
            "DELIVERY_POLL_INTERVAL": "0.2",
            "PYTHONUNBUFFERED": "1",
            # The agents' default state folder (agent.config.default_state_dir): never the machine's
            # /var/lib/exchange-agent, which the tests would otherwise share as root.
            "STATE_DIRECTORY": str(tmp / "agent-state"),
        }
    )
    return env
