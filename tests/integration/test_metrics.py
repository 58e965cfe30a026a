"""/metrics on the live portal: two uvicorn workers sharing their counters, scraped after real
uploads, deliveries and heartbeats from agent processes, the text checked by Debian's promtool
and its numbers held against the database."""

import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.dicomfiles import dicom_bytes, write_study
from tests.integration.stack import PYTHON, free_port, wait_for

pytestmark = pytest.mark.integration

TOKEN = "scraper-" + uuid.uuid4().hex
PATIENT_ID = "PAT-METRICS-7"


@pytest.fixture(scope="module")
def metrics_portal(postgres_stack, tmp_path_factory):
    """A portal of its own on the installation, its two workers' counters in one multi-process folder."""
    folder = tmp_path_factory.mktemp("prometheus-multiproc")
    port = free_port()
    env = {**postgres_stack.env, "METRICS_TOKEN": TOKEN, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    postgres_stack.start_server(port=port, env=env, name="metrics")
    return f"http://127.0.0.1:{port}"


def scrape(url: str) -> str:
    # A new connection per scrape, so scrapes land on either worker.
    answer = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.text


def samples_of(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def deliveries(stack, center: str, status: str) -> int:
    [(count,)] = stack.sql(
        "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id "
        "WHERE c.slug = %s AND d.status = %s",
        center,
        status,
    )
    return count


def test_the_live_portals_metrics_are_valid_and_match_the_database(
    postgres_stack, pg_network, metrics_portal, tmp_path
):
    stack, s = postgres_stack, pg_network.s
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus (tests/services.sh does, as root)"
    assert httpx.get(f"{metrics_portal}/metrics", timeout=30).status_code == 401

    # Seven instances to the partner (the region's all), two MR to the MR center, one US to the outsider.
    outbox = tmp_path / "outbox"
    written = write_study(outbox, series={"CT": 4, "MR": 2}, patient_id=PATIENT_ID)
    (outbox / "us.dcm").write_bytes(dicom_bytes("US", patient_id=PATIENT_ID))
    sent = stack.agent(pg_network.keys["own"], "send", str(outbox), server=metrics_portal)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(lambda: deliveries(stack, f"mr-{s}", "queued") == 2, what="the fan-out to the MR center")
    wait_for(lambda: deliveries(stack, f"partner-{s}", "queued") == 7, what="the fan-out to the partner")
    wait_for(lambda: deliveries(stack, f"outsider-{s}", "queued") == 1, what="the fan-out to the outsider")

    # The partner's agent runs as a service (receive, with its heartbeat) until it has everything.
    config = tmp_path / "partner.toml"
    config.write_text(
        f'server = "{metrics_portal}"\nkey = "{pg_network.keys["partner"]}"\nstate_dir = "partner-state"\n'
        f'[run]\nroles = ["receive"]\nheartbeat = 5\n[receive]\ninbox = "inbox"\nwait = 1\n'
    )
    config.chmod(0o600)
    (tmp_path / "inbox").mkdir()
    receiver = stack.spawn("partner-agent", [PYTHON, "-m", "agent", "--config", str(config), "run"])
    try:
        wait_for(lambda: deliveries(stack, f"partner-{s}", "delivered") == 7, timeout=60, what="the partner's seven")
        wait_for(
            lambda: (
                stack.sql(
                    "SELECT count(*) FROM centers_agentheartbeat a JOIN centers_center c ON c.id = a.center_id "
                    "WHERE c.slug = %s",
                    f"partner-{s}",
                )
                == [(1,)]
            ),
            what="the partner agent's heartbeat",
        )
    finally:
        receiver.stop()
    assert receiver.popen.returncode == 0, receiver.log()

    # One MR file lost from storage: the MR center's agent gets the other, and that one fails for good.
    [mr_file] = stack.sql(
        "SELECT file FROM routing_instance WHERE sop_instance_uid = %s",
        next(uid for path, uid in written.items() if path.name.startswith("MR")),
    )[0]
    (Path(stack.env["DICOM_STORAGE_DIR"]) / mr_file).unlink()
    (tmp_path / "mr-inbox").mkdir()
    stack.agent(
        pg_network.keys["mr"], "receive", "--inbox", str(tmp_path / "mr-inbox"), "--once", server=metrics_portal
    )
    wait_for(lambda: deliveries(stack, f"mr-{s}", "failed") == 1, what="the MR delivery whose file is lost")
    assert deliveries(stack, f"mr-{s}", "delivered") == 1

    text = scrape(metrics_portal)
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert PATIENT_ID not in text and "Doe" not in text
    assert not [uid for uid in written.values() if uid in text]

    samples = samples_of(text)
    # Both workers' counters in every scrape, whichever worker answers it.
    for _ in range(5):
        again = samples_of(scrape(metrics_portal))
        assert value(again, "dicom_exchange_ingest_total", result="stored") == 7
    [(stored_bytes,)] = stack.sql(
        "SELECT sum(i.size) FROM routing_instance i JOIN centers_center c ON c.id = i.source_center_id "
        "WHERE c.slug = %s",
        f"own-{s}",
    )
    assert value(samples, "dicom_exchange_ingest_total", result="stored") == 7
    assert value(samples, "dicom_exchange_ingest_bytes_total") == stored_bytes
    assert value(samples, "dicom_exchange_ingest_duration_seconds_count") == 7
    assert value(samples, "dicom_exchange_ingest_duration_seconds_bucket", le="+Inf") == 7
    assert value(samples, "dicom_exchange_deliveries_leased_total", center=f"partner-{s}") == 7
    assert value(samples, "dicom_exchange_deliveries_acked_total", center=f"partner-{s}", result="delivered") == 7
    assert value(samples, "dicom_exchange_deliveries_leased_total", center=f"mr-{s}") == 2
    assert value(samples, "dicom_exchange_deliveries_acked_total", center=f"mr-{s}", result="delivered") == 1

    for center in (f"partner-{s}", f"mr-{s}", f"outsider-{s}"):
        for status, name in (("queued", "queued"), ("leased", "in_flight"), ("failed", "failed")):
            expected = deliveries(stack, center, status)
            assert value(samples, f"dicom_exchange_deliveries_{name}", center=center) == expected, (center, status)
    assert value(samples, "dicom_exchange_deliveries_queued", center=f"outsider-{s}") == 1
    assert value(samples, "dicom_exchange_deliveries_failed", center=f"mr-{s}") == 1
    [(age,)] = stack.sql(
        "SELECT extract(epoch FROM now() - min(d.created_at)) FROM routing_delivery d "
        "JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s AND d.status = 'queued'",
        f"outsider-{s}",
    )
    assert 0 < value(samples, "dicom_exchange_deliveries_oldest_queued_age_seconds", center=f"outsider-{s}") <= age
    assert value(samples, "dicom_exchange_deliveries_oldest_queued_age_seconds", center=f"partner-{s}") == 0

    [(hostname, last_seen)] = stack.sql(
        "SELECT a.hostname, extract(epoch FROM a.last_seen_at) FROM centers_agentheartbeat a "
        "JOIN centers_center c ON c.id = a.center_id WHERE c.slug = %s",
        f"partner-{s}",
    )
    contact = value(
        samples, "dicom_exchange_agent_last_contact_timestamp_seconds", center=f"partner-{s}", hostname=hostname
    )
    assert contact == pytest.approx(float(last_seen), abs=1e-3)

    queue = stack.env["CELERY_QUEUE"]
    assert value(samples, "dicom_exchange_broker_up") == 1
    assert value(samples, "dicom_exchange_celery_queue_messages", queue=queue) >= 0
