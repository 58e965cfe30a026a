"""The broker settings: a failover list of RabbitMQ nodes, and quorum queues on request."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NODES = "amqp://u:p@mq1:5672//;amqp://u:p@mq2:5672//;amqp://u:p@mq3:5672//"

# What the worker and the web processes declare and connect to, read from Celery itself.
PROBE = """
import json
from portal.celery import app
queue = app.amqp.queues[app.conf.task_default_queue]
print(json.dumps({
    "arguments": queue.queue_arguments or {},
    "exchange_type": queue.exchange.type,
    "urls": app.connection_for_write().alt,
    "confirm_publish": app.connection_for_write().transport_options.get("confirm_publish"),
}))
"""


def probe(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "LANG")}
    env.update({"PORTAL_VAR_DIR": str(tmp_path / "var"), "CELERY_BROKER_URL": NODES, **extra})
    return subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_quorum_declares_a_quorum_queue_on_a_topic_exchange_and_keeps_every_node_for_failover(tmp_path):
    result = probe(tmp_path, CELERY_QUEUE_TYPE="quorum")

    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["arguments"] == {"x-queue-type": "quorum"}
    assert seen["exchange_type"] == "topic"
    assert seen["urls"] == NODES.split(";")
    # A publish counts once the broker confirms it (a quorum queue: once a majority holds it).
    assert seen["confirm_publish"] is True


def test_the_default_is_a_classic_queue(tmp_path):
    result = probe(tmp_path)

    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["arguments"] == {} and seen["exchange_type"] == "direct"


def test_an_unknown_queue_type_stops_start_up(tmp_path):
    result = probe(tmp_path, CELERY_QUEUE_TYPE="mirrored")

    assert result.returncode != 0
    assert "CELERY_QUEUE_TYPE='mirrored'" in result.stderr
