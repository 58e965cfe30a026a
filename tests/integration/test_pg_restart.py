"""PostgreSQL restarting under load: no request answers 500, and nothing accepted is lost.

The shared PostgreSQL serves everyone's tests, so this test runs a cluster of its own
(initdb, pg_ctl as the postgres OS user, which PostgreSQL requires) and restarts that.
"""

import glob
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.dicomfiles import dicom_bytes
from tests.integration.conftest import TEST_BROKER_URL, Network, _check_broker, _delete_queue
from tests.integration.stack import Stack, base_env, free_port, wait_for

pytestmark = pytest.mark.integration


class OwnPostgres:
    """A throwaway PostgreSQL cluster on a free port, run by the postgres OS user."""

    def __init__(self) -> None:
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not binaries or shutil.which("runuser") is None:
            pytest.fail("PostgreSQL's server binaries and runuser are needed (apt-get install postgresql)")
        self.bin = Path(binaries[-1]).parent
        # Not under pytest's tmp_path: its parents are private to root, and the server is not root.
        self.dir = Path(tempfile.mkdtemp(prefix="dx-own-pg-"))
        self.dir.chmod(0o755)
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")
        self.ctl("start")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}"

    def _as_postgres(self, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True, timeout=120, cwd=self.dir
        )
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def ctl(self, action: str, *args: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            str(self.bin / "pg_ctl"), action, "-D", str(self.data), "-l", str(self.dir / "server.log"),
            "-w", "-t", "60", "-o", options, *args,
        )  # fmt: skip

    def create_database(self, name: str) -> str:
        with psycopg.connect(f"{self.url}/postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"{self.url}/{name}"

    def destroy(self) -> None:
        try:
            self.ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory):
    _check_broker()
    server = OwnPostgres()
    tmp = tmp_path_factory.mktemp("stack-own-pg")
    queue = f"dx-it-{uuid.uuid4().hex[:8]}"
    env = base_env(tmp)
    env.update(
        {
            "DATABASE_URL": server.create_database("exchange"),
            "CELERY_BROKER_URL": TEST_BROKER_URL,
            "CELERY_QUEUE": queue,
            # A request that finds the database down waits this long for a connection, then answers 503.
            "DB_POOL_TIMEOUT": "5",
        }
    )
    running = Stack(tmp=tmp, env=env, with_worker=True)
    running.backend = "postgres"
    running.pg = server
    try:
        running.start()
        yield running
    finally:
        running.stop()
        server.destroy()
        _delete_queue(queue)


class Load:
    """Uploads and long polls from threads, every answer recorded, until told to stop."""

    def __init__(self, stack: Stack, network: Network) -> None:
        self.stack, self.network = stack, network
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[str, int, str]] = []  # (what, status, Retry-After)
        self.stored: list[str] = []  # SOP instance UIDs answered 2xx
        self.failures: list[str] = []  # transport errors: the portal itself must stay up
        self.threads = [threading.Thread(target=self._upload, daemon=True) for _ in range(3)]
        self.threads += [threading.Thread(target=self._poll, args=(wait,), daemon=True) for wait in (0, 0, 2)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _record(self, what: str, response: httpx.Response) -> None:
        with self.lock:
            self.answers.append((what, response.status_code, response.headers.get("retry-after", "")))

    def _upload(self) -> None:
        headers = {"Authorization": f"Bearer {self.network.keys['own']}", "Content-Type": "application/dicom"}
        with httpx.Client(base_url=self.stack.url, timeout=60) as client:
            while not self.stop.is_set():
                sop_uid = f"2.25.{uuid.uuid4().int}"
                try:
                    response = client.post(
                        "/api/v1/instances", content=dicom_bytes("CT", sop_uid=sop_uid), headers=headers
                    )
                except httpx.HTTPError as exc:
                    self.failures.append(f"upload: {exc!r}")
                    continue
                self._record("upload", response)
                if response.is_success:
                    with self.lock:
                        self.stored.append(sop_uid)

    def _poll(self, wait: int) -> None:
        headers = {"Authorization": f"Bearer {self.network.keys['partner']}"}
        with httpx.Client(base_url=self.stack.url, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    response = client.get("/api/v1/deliveries", params={"wait": wait, "limit": 5}, headers=headers)
                except httpx.HTTPError as exc:
                    self.failures.append(f"poll: {exc!r}")
                    continue
                self._record(f"poll wait={wait}", response)

    def stored_count(self) -> int:
        with self.lock:
            return len(self.stored)


def test_no_request_answers_500_across_a_postgres_restart_and_every_accepted_upload_is_routed(own_stack):
    stack = own_stack
    network = Network(stack)
    with Load(stack, network) as load:
        wait_for(lambda: load.stored_count() >= 15, timeout=120, what="uploads before the restart")
        before = load.stored_count()
        stack.pg.ctl("restart", "-m", "fast")
        wait_for(lambda: load.stored_count() >= before + 15, timeout=180, what="uploads after the restart")
        stack.pg.ctl("restart", "-m", "immediate")
        after_second = load.stored_count()
        wait_for(lambda: load.stored_count() >= after_second + 15, timeout=180, what="uploads after a crash restart")

    statuses: dict[tuple[str, int], int] = {}
    for what, status, _ in load.answers:
        statuses[what, status] = statuses.get((what, status), 0) + 1
    print(f"answers across two restarts: {sorted(statuses.items())}")
    assert not load.failures, load.failures[:5]
    server_errors = [(what, status) for what, status, _ in load.answers if status >= 500 and status != 503]
    assert not server_errors, f"answered 5xx other than 503: {server_errors[:10]}"
    assert all(retry.isdigit() for _, status, retry in load.answers if status == 503), "a 503 without Retry-After"
    assert not [a for a in load.answers if a[1] not in (200, 201, 503)], "an unexpected answer"

    # Every upload that was answered 2xx is stored, and routed to the subscriber (the sweep
    # routes any whose fan-out task met the database down).
    partner = f"partner-{network.s}"

    def routed() -> bool:
        rows = stack.sql(
            "SELECT i.sop_instance_uid FROM routing_instance i"
            " JOIN routing_delivery d ON d.instance_id = i.id JOIN centers_center c ON c.id = d.center_id"
            " WHERE c.slug = %s",
            partner,
        )
        return set(load.stored) <= {uid for (uid,) in rows}

    wait_for(routed, timeout=120, interval=1, what="every accepted upload to be routed")
    rows = stack.sql("SELECT sop_instance_uid, file, size FROM routing_instance")
    assert set(load.stored) <= {uid for uid, _, _ in rows}
    storage = Path(stack.env["DICOM_STORAGE_DIR"])
    assert all((storage / name).stat().st_size == size for uid, name, size in rows if uid in set(load.stored))
