import os
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.stack import BIN, Process, Stack, base_env, free_port, wait_for

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL") or os.environ.get(
    "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/dicom_exchange"
)
TEST_BROKER_URL = os.environ.get("TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _admin_url() -> str:
    base, _, _ = TEST_DATABASE_URL.rpartition("/")
    return f"{base}/postgres"


def _create_database() -> str:
    import psycopg

    name = f"dx_it_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(_admin_url(), autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is needed at {_admin_url()} for the integration tests: {exc}")
    return name


def _drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(_admin_url(), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _check_broker() -> None:
    from kombu import Connection

    try:
        with Connection(TEST_BROKER_URL, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        pytest.fail(f"RabbitMQ is needed at {TEST_BROKER_URL} for the integration tests: {exc}")


def _delete_queue(name: str) -> None:
    """A stack's queue, and its stat queue (named after it, as CELERY_STAT_QUEUE is by default)."""
    from kombu import Connection

    with Connection(TEST_BROKER_URL) as connection:
        channel = connection.channel()
        channel.queue_delete(name)
        channel.queue_delete(f"{name}-stat")


class S3Server:
    """moto's standalone S3 server, a process of its own that speaks the S3 protocol over HTTP."""

    region = "us-east-1"
    access_key = "exchange-test"
    secret_key = "exchange-test-secret"

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.recording = tmp / "moto-recording.jsonl"
        self.process = Process(
            "moto",
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            {**os.environ, "MOTO_RECORDER_FILEPATH": str(self.recording)},
            tmp,
        )
        wait_for(self._up, timeout=60, what="the S3 server (moto_server)")

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/moto-api/data.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def new_bucket(self) -> str:
        name = f"dx-it-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str) -> dict:
        """A portal's environment for its DICOM files in `bucket`."""
        return {
            "STORAGE_BACKEND": "s3",
            "S3_BUCKET": bucket,
            "S3_ENDPOINT_URL": self.url,
            "S3_REGION": self.region,
            "S3_ACCESS_KEY_ID": self.access_key,
            "S3_SECRET_ACCESS_KEY": self.secret_key,
        }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.process.stop()


def _broker_and_database(env: dict) -> tuple[str, str]:
    """A database and a queue of the stack's own on the shared PostgreSQL and RabbitMQ."""
    _check_broker()
    database = _create_database()
    queue = f"dx-it-{uuid.uuid4().hex[:8]}"
    base, _, _ = TEST_DATABASE_URL.rpartition("/")
    env.update({"DATABASE_URL": f"{base}/{database}", "CELERY_BROKER_URL": TEST_BROKER_URL, "CELERY_QUEUE": queue})
    return database, queue


@pytest.fixture(scope="module", params=["postgres", "sqlite", "s3"])
def stack(request, tmp_path_factory):
    """A running portal: PostgreSQL + RabbitMQ + a real worker, the embedded defaults,
    or PostgreSQL + RabbitMQ + a real worker with the files in an S3 bucket."""
    tmp = tmp_path_factory.mktemp(f"stack-{request.param}")
    env = base_env(tmp)
    database = queue = None
    if request.param in ("postgres", "s3"):
        database, queue = _broker_and_database(env)
    else:
        env["DATABASE_URL"] = f"sqlite:///{tmp / 'var' / 'db.sqlite3'}"
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_server")
        env.update(s3.env(s3.new_bucket()))
    running = Stack(tmp=tmp, env=env, with_worker=request.param != "sqlite")
    running.backend = request.param
    try:
        running.start()
        yield running
    finally:
        running.stop()
        if database:
            _drop_database(database)
        if queue:
            _delete_queue(queue)


@pytest.fixture(scope="module")
def postgres_stack(tmp_path_factory):
    """For the tests that are about the broker and the worker."""
    tmp = tmp_path_factory.mktemp("stack-postgres-only")
    env = base_env(tmp)
    database, queue = _broker_and_database(env)
    running = Stack(tmp=tmp, env=env, with_worker=True)
    running.backend = "postgres"
    try:
        running.start()
        yield running
    finally:
        running.stop()
        _drop_database(database)
        _delete_queue(queue)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for name in ("stack", "postgres_stack"):
            running = item.funcargs.get(name)
            if running is not None:
                report.sections.append((f"logs of {name}", running.logs()))


class Network:
    """A test's own corner of the network: its own region, so tests never route into each other."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.s = uuid.uuid4().hex[:6]
        self.region = f"fars-{self.s}"
        stack.load_network(
            f"""
regions:
  - {{slug: {self.region}, name: Fars {self.s}, cities: [{{slug: shiraz, name: Shiraz}}, {{slug: marvdasht, name: M}}]}}
  - {{slug: tehran-{self.s}, name: Tehran {self.s}, cities: [{{slug: tehran, name: Tehran}}]}}
centers:
  - {{slug: own-{self.s}, name: Shiraz Imaging, city: {self.region}/shiraz, publish: true, subscribe: false}}
  - {{slug: partner-{self.s}, name: Tehran Hospital, city: tehran-{self.s}/tehran, publish: false, subscribe: true,
     subscriptions: ["{self.region}.#"]}}
  - {{slug: mr-{self.s}, name: Marvdasht MR, city: {self.region}/marvdasht, publish: false, subscribe: true,
     subscriptions: ["{self.region}.*.mr"]}}
  - {{slug: outsider-{self.s}, name: Tehran Outsider, city: tehran-{self.s}/tehran, publish: true, subscribe: true,
     subscriptions: ["tehran-{self.s}.#", "{self.region}.*.us"]}}
"""
        )
        self.keys = {role: stack.issue_key(f"{role}-{self.s}") for role in ("own", "partner", "mr", "outsider")}


@pytest.fixture
def network(stack):
    return Network(stack)


@pytest.fixture
def pg_network(postgres_stack):
    return Network(postgres_stack)
