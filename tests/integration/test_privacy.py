"""No patient name or patient ID in any log line or broker message.

A marker patient goes through everything that touches patient data, every process
logging at DEBUG: ingest (the agent's `send`), fan-out (a real Celery worker on
RabbitMQ; its messages are read off the queue before the worker takes them),
delivery (the agent's `receive --once`), DICOMweb (QIDO by the marker's name, WADO
retrieve and metadata) and the UI (a clinician's Received list, its search and the
study page). The marker must reach every one of those answers and no log.
"""

import re
import uuid

import httpx
import pytest
from kombu import Connection

from tests.dicomfiles import dicom_bytes
from tests.integration.conftest import (
    TEST_BROKER_URL,
    TEST_DATABASE_URL,
    Network,
    _check_broker,
    _create_database,
    _delete_queue,
    _drop_database,
)
from tests.integration.stack import BIN, Stack, base_env, wait_for

pytestmark = pytest.mark.integration

PATIENT_NAME = "MARKER^ZEBRAFISH"
PATIENT_ID = "PIDMARKER123"
# The name as DICOM and the UI may spell it: components, case, the caret as a space or a comma.
LEAKS = re.compile(r"zebrafish|pidmarker|marker[\^ ,]", re.IGNORECASE)
PASSWORD = "a long clinician password"


@pytest.fixture(scope="module")
def debug_stack(tmp_path_factory):
    """A PostgreSQL + RabbitMQ stack whose server and worker log at DEBUG; the worker starts later."""
    _check_broker()
    tmp = tmp_path_factory.mktemp("stack-privacy")
    database = _create_database()
    queue = f"dx-it-{uuid.uuid4().hex[:8]}"
    base, _, _ = TEST_DATABASE_URL.rpartition("/")
    env = base_env(tmp)
    env.update(
        {
            "DATABASE_URL": f"{base}/{database}",
            "CELERY_BROKER_URL": TEST_BROKER_URL,
            "CELERY_QUEUE": queue,
            "LOG_LEVEL": "DEBUG",
        }
    )
    stack = Stack(tmp=tmp, env=env, with_worker=False)
    stack.queue = queue
    try:
        stack.manage("migrate", "--no-input", "-v0")
        stack.server = stack.start_server()
        yield stack
    finally:
        stack.stop()
        _drop_database(database)
        _delete_queue(queue)


def start_debug_worker(stack: Stack) -> None:
    stack.spawn(
        "worker",
        [
            str(BIN / "celery"), "-A", "portal", "worker", "-B", "--loglevel=DEBUG", "--concurrency=1",
            "--without-gossip", "--without-mingle", "-n", f"dx-{uuid.uuid4().hex[:8]}@%h",
            "-s", str(stack.tmp / "beat-schedule"),
        ],
    )  # fmt: skip


def queued_bodies(queue: str) -> list[bytes]:
    """Every message waiting in the queue, read and handed back unacknowledged (requeued)."""
    bodies = []
    with Connection(TEST_BROKER_URL) as connection:
        channel = connection.channel()
        while (message := channel.basic_get(queue, no_ack=False)) is not None:
            bodies.append(message.body if isinstance(message.body, bytes) else str(message.body).encode())
            bodies.append(repr(message.headers).encode() + repr(message.properties).encode())
        channel.close()  # unacknowledged: all of them go back to the queue
    return bodies


def login(stack: Stack, username: str) -> httpx.Client:
    browser = httpx.Client(base_url=stack.url, timeout=30, follow_redirects=False)
    page = browser.get("/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    answer = browser.post("/login/", data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": token})
    assert answer.status_code == 302, answer.text
    return browser


def test_the_marker_patient_reaches_every_answer_and_no_log_line_or_broker_message(debug_stack, tmp_path):
    stack = debug_stack
    network = Network(stack)
    publisher, subscriber = network.keys["own"], network.keys["partner"]
    study_uid = f"2.25.{uuid.uuid4().int}"
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "ct.dcm").write_bytes(
        dicom_bytes("CT", study_uid=study_uid, patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    )
    outputs = {}

    # Ingest, with no worker yet: the fan-out task waits in the queue to be read.
    sent = stack.agent(publisher, "--verbose", "send", str(outbox))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    outputs["agent send"] = sent.stdout + sent.stderr
    bodies = wait_for(lambda: queued_bodies(stack.queue), timeout=30, what="the fan-out message in the queue")
    assert any(b"route_instance" in body for body in bodies)
    leaked = [body for body in bodies if LEAKS.search(body.decode("utf-8", "replace"))]
    assert not leaked, f"a broker message carries patient data: {leaked[:2]}"

    # Fan-out and delivery.
    start_debug_worker(stack)
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    def delivered():
        received = stack.agent(subscriber, "--verbose", "receive", "--inbox", str(inbox), "--once")
        assert received.returncode == 0, received.stdout + received.stderr
        outputs.setdefault("agent receive", "")
        outputs["agent receive"] += received.stdout + received.stderr
        return list(inbox.rglob("*.dcm"))

    [path] = wait_for(delivered, timeout=90, interval=1, what="the marker's file in the inbox")
    assert PATIENT_ID in path.parts, "the inbox is filed by patient ID: the path itself is not a log"

    # DICOMweb, as the subscriber.
    dicomweb = httpx.Client(base_url=f"{stack.url}/dicomweb", headers={"Authorization": f"Bearer {subscriber}"})
    found = dicomweb.get("/studies", params={"PatientName": PATIENT_NAME}, headers={"Accept": "application/dicom+json"})
    assert found.status_code == 200, found.text
    assert PATIENT_ID in found.text
    assert dicomweb.get("/studies", params={"PatientID": PATIENT_ID}).status_code == 200
    metadata = dicomweb.get(f"/studies/{study_uid}/metadata")
    assert metadata.status_code == 200 and "ZEBRAFISH" in metadata.text
    retrieved = dicomweb.get(f"/studies/{study_uid}", headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert retrieved.status_code == 200 and PATIENT_ID.encode() in retrieved.content

    # The UI, as a clinician of the subscribing center.
    username = f"dr-privacy-{network.s}"
    stack.manage("create_clinician", username, f"partner-{network.s}", "--password", PASSWORD)
    browser = login(stack, username)
    received = browser.get("/received/")
    assert received.status_code == 200 and "ZEBRAFISH" in received.text.upper()
    searched = browser.get("/received/", params={"q": "zebrafish"})
    assert searched.status_code == 200 and study_uid in searched.text
    assert PATIENT_ID in browser.get("/received/", params={"q": PATIENT_ID}).text
    page = browser.get(f"/studies/{study_uid}/")
    assert page.status_code == 200 and PATIENT_ID in page.text

    # Every process's log, and the agents' own output.
    wait_for(
        lambda: "route_instance" in "".join(p.log() for p in stack.processes if p.name == "worker"),
        timeout=30,
        what="the worker's log of the fan-out",
    )
    outputs.update({f"{p.name} ({p.log_path.name})": p.log() for p in stack.processes})
    logged_at_debug = {p.name for p in stack.processes if " DEBUG " in p.log() or ": DEBUG/" in p.log()}
    assert logged_at_debug == {"server", "worker"}, "a process did not log at DEBUG: the test would prove little"
    leaks = [f"{name}: {line}" for name, text in outputs.items() for line in text.splitlines() if LEAKS.search(line)]
    assert not leaks, "patient data in the logs:\n" + "\n".join(leaks[:20])
