"""Edge tests: the site agent against real DICOM peers (dcmtk, Orthanc) and the real portal stack.

The portal is the integration suite's PostgreSQL + RabbitMQ + worker stack. A second web
process on the same database hands out short leases, so a delivery left unacknowledged
(PACS down, agent killed) comes back in seconds instead of five minutes.
"""

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.edge.netns import Namespace
from tests.integration import conftest as integration
from tests.integration.stack import PYTHON, ROOT, Process, free_port, wait_for

# The integration suite's stack fixtures, shared rather than copied.
postgres_stack = integration.postgres_stack
pg_network = integration.pg_network

LEASE_SECONDS = 3
DICOM_ENV = {"TCP_NODELAY": "1"}  # dcmtk 3.6.7 is ~20x slower on loopback without it


@pytest.fixture(scope="module")
def portal(postgres_stack):
    """The URL of a portal web process with short leases."""
    port = free_port()
    postgres_stack.start_server(
        port=port, env={**postgres_stack.env, "DELIVERY_LEASE_SECONDS": str(LEASE_SECONDS)}, name="server-short-lease"
    )
    return f"http://127.0.0.1:{port}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        running = item.funcargs.get("postgres_stack")
        if running is not None:
            report.sections.append(("logs of the stack, agents and peers", running.logs()))


def agent(stack, *args: str, name: str = "agent") -> Process:
    """A long-running `python -m agent` process, logged with the stack."""
    return stack.spawn(name, [PYTHON, "-m", "agent", *args], env={**stack.env, **DICOM_ENV})


def agent_run(stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "agent", *args],
        cwd=ROOT,
        env={**stack.env, **DICOM_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dcmtk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env={**os.environ, **DICOM_ENV}, capture_output=True, text=True, timeout=timeout)


def wait_for_port(port: int, timeout: float = 90) -> None:
    def open_() -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(open_, timeout=timeout, what=f"a listener on port {port}")


def wait_for_log(process: Process, pattern: str, timeout: float = 90) -> re.Match:
    return wait_for(lambda: re.search(pattern, process.log()), timeout=timeout, what=f"{pattern!r} in {process.name}")


def delivered(stack, center_slug: str) -> int:
    return stack.sql(
        "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id "
        "WHERE c.slug = %s AND d.status = 'delivered'",
        center_slug,
    )[0][0]


def queued_or_leased(stack, center_slug: str) -> int:
    return stack.sql(
        "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id "
        "WHERE c.slug = %s AND d.status <> 'delivered'",
        center_slug,
    )[0][0]


class SlowLink:
    """A relay to the portal that passes its answers on at `rate` bytes a second.

    A download through it takes seconds whatever the machine's load, so a test can
    act while the file is still being written instead of racing a fast loopback.
    """

    def __init__(self, upstream_port: int, rate: int) -> None:
        self.upstream_port = upstream_port
        self.rate = rate
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.rate), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, rate: int | None) -> None:
        try:
            while data := source.recv(16384):
                sink.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in (source, sink):
                sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def slow_portal(portal):
    """The short-lease portal behind a 256 KB/s link."""
    link = SlowLink(int(portal.rpartition(":")[2]), rate=256 * 1024)
    try:
        yield link.url
    finally:
        link.close()


class StoreSCP:
    """dcmtk's storescp in its own network namespace, reached through a relayed port."""

    AET = "STORESCP"
    INNER_PORT = 11104

    def __init__(self, stack, folder: Path) -> None:
        self.stack = stack
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.namespace = Namespace()
        self.port = self.namespace.relay(self.INNER_PORT)
        self.process: Process | None = None

    @property
    def peer(self) -> str:
        return f"{self.AET}@127.0.0.1:{self.port}"

    def start(self) -> None:
        # +xa: every transfer syntax dcmtk knows; +B: the dataset written exactly as received.
        args = ["storescp", "-aet", self.AET, "+xa", "+B", "-od", str(self.folder), "-fe", ".dcm", str(self.INNER_PORT)]
        self.process = self.stack.spawn("storescp", self.namespace.command(args), env={**self.stack.env, **DICOM_ENV})
        wait_for(
            lambda: dcmtk("echoscu", "-aec", self.AET, "127.0.0.1", str(self.port)).returncode == 0,
            what="storescp to answer C-ECHO",
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("*.dcm"))


@pytest.fixture
def storescp(postgres_stack, tmp_path):
    peer = StoreSCP(postgres_stack, tmp_path / "storescp")
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()
        peer.namespace.close()


class Orthanc:
    """Debian's Orthanc server in its own network namespace; its DICOM and REST ports are relayed."""

    AET = "ORTHANC"

    def __init__(self, stack, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "edge-test",
            "DicomAet": self.AET,
            "DicomPort": 4242,
            "HttpPort": 8042,
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.namespace = Namespace()
        self.port = self.namespace.relay(4242)
        self.http = f"http://127.0.0.1:{self.namespace.relay(8042)}"
        self.process = stack.spawn(
            "orthanc", self.namespace.command(["/usr/sbin/Orthanc", str(folder / "orthanc.json")])
        )
        wait_for(self._up, what="Orthanc's REST API")

    @property
    def peer(self) -> str:
        return f"{self.AET}@127.0.0.1:{self.port}"

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.http}/system", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def instances(self) -> list[str]:
        return httpx.get(f"{self.http}/instances", timeout=10).json()

    def file(self, orthanc_id: str) -> bytes:
        return httpx.get(f"{self.http}/instances/{orthanc_id}/file", timeout=30).content

    def close(self) -> None:
        self.process.stop(signal.SIGTERM)
        self.namespace.close()


@pytest.fixture
def orthanc(postgres_stack, tmp_path):
    server = Orthanc(postgres_stack, tmp_path / "orthanc")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 100 KB file system, room for about two sample CT images: a disk that fills up."""
    mount = tmp_path / "small-tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mount)], capture_output=True)
    assert result.returncode == 0, f"cannot mount a small tmpfs (the edge tests need root): {result.stderr!r}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
