"""/metrics: who may scrape it, and that its numbers are the exchange's own."""

import os
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone
from kombu import Connection, Exchange, Producer, Queue
from prometheus_client.parser import text_string_to_metric_families

from centers.models import AgentHeartbeat
from portal import metrics
from routing import delivery_services
from routing.models import Delivery
from tests.dicomfiles import dicom_bytes
from tests.integration.stack import free_port

URL = "/metrics"
TOKEN = "operators-only-" + uuid.uuid4().hex
BROKER_URL = os.environ.get("TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(autouse=True)
def one_process(monkeypatch, settings):
    """The test process's own counters (no multi-process files), a token, no broker, nothing cached."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    settings.METRICS_TOKEN = TOKEN
    settings.METRICS_ALLOWED_ADDRESSES = []
    settings.CELERY_TASK_ALWAYS_EAGER = True
    metrics._depth_cache.clear()
    yield
    metrics._depth_cache.clear()


def scrape(client) -> dict[tuple[str, tuple], float]:
    answer = client.get(URL, HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert answer.status_code == 200, answer.content
    assert answer["Content-Type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.content.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.django_db
def test_it_answers_only_the_operators_token(client):
    assert client.get(URL).status_code == 401
    assert client.get(URL).headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get(URL, HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get(URL, HTTP_AUTHORIZATION=f"Basic {TOKEN}").status_code == 401
    assert client.get(URL, HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200
    assert client.post(URL, HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 405


@pytest.mark.django_db
def test_with_neither_token_nor_addresses_it_serves_no_one(client, settings):
    settings.METRICS_TOKEN = ""
    assert client.get(URL).status_code == 403
    assert client.get(URL, HTTP_AUTHORIZATION="Bearer ").status_code == 403


@pytest.mark.django_db
def test_an_allowed_address_is_served_without_a_token(client, settings):
    settings.METRICS_TOKEN = ""
    settings.METRICS_ALLOWED_ADDRESSES = ["10.0.0.0/8", "192.0.2.7"]
    assert client.get(URL, REMOTE_ADDR="10.20.30.40").status_code == 200
    assert client.get(URL, REMOTE_ADDR="192.0.2.7").status_code == 200
    assert client.get(URL, REMOTE_ADDR="192.0.2.8").status_code == 403
    assert client.get(URL, REMOTE_ADDR="127.0.0.1").status_code == 403


@pytest.mark.django_db
def test_it_counts_uploads_leases_and_acks(client, agents, network):
    before = scrape(client)
    ct = dicom_bytes("CT")
    assert agents["own"].upload(ct).status_code == 201
    assert agents["own"].upload(ct).status_code == 200
    assert agents["own"].upload(b"not a DICOM file at all" * 10).status_code == 400
    [leased] = agents["partner"].lease().json()
    assert agents["partner"].ack(leased["id"], leased["sha256"]).status_code == 200
    after = scrape(client)

    def grew(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("dicom_exchange_ingest_total", result="stored") == 1
    assert grew("dicom_exchange_ingest_total", result="duplicate") == 1
    assert grew("dicom_exchange_ingest_total", result="refused") == 1
    assert grew("dicom_exchange_ingest_bytes_total") == leased["size"]
    assert grew("dicom_exchange_ingest_duration_seconds_count") == 3
    assert grew("dicom_exchange_ingest_duration_seconds_sum") > 0
    assert grew("dicom_exchange_deliveries_leased_total", center="tehran-hospital") == 1
    assert grew("dicom_exchange_deliveries_acked_total", center="tehran-hospital", result="delivered") == 1


@pytest.mark.django_db
def test_each_centers_queue_is_read_from_the_database(client, agents, network):
    for _ in range(3):
        assert agents["own"].upload(dicom_bytes("CT")).status_code == 201
    assert agents["own"].upload(dicom_bytes("NM")).status_code == 201  # to the partner and the outsider
    assert len(agents["partner"].lease(limit=1).json()) == 1
    waiting = Delivery.objects.filter(center=network["partner"], status=Delivery.Status.QUEUED)
    delivery_services.delivery_fail(delivery=waiting.order_by("pk").last(), reason="test")
    oldest = waiting.order_by("pk").first()
    Delivery.objects.filter(pk=oldest.pk).update(created_at=timezone.now() - timedelta(hours=2))

    samples = scrape(client)
    for center in ("tehran-hospital", "isfahan-nuclear"):
        for status, name in (("queued", "queued"), ("leased", "in_flight"), ("failed", "failed")):
            expected = Delivery.objects.filter(center__slug=center, status=status).count()
            assert value(samples, f"dicom_exchange_deliveries_{name}", center=center) == expected, (center, status)
    assert value(samples, "dicom_exchange_deliveries_queued", center="tehran-hospital") == 2
    assert value(samples, "dicom_exchange_deliveries_in_flight", center="tehran-hospital") == 1
    assert value(samples, "dicom_exchange_deliveries_failed", center="tehran-hospital") == 1
    assert value(samples, "dicom_exchange_deliveries_queued", center="isfahan-nuclear") == 1
    assert 2 * 3600 <= value(samples, "dicom_exchange_deliveries_oldest_queued_age_seconds", center="tehran-hospital")
    assert value(samples, "dicom_exchange_deliveries_oldest_queued_age_seconds", center="isfahan-nuclear") < 3600
    # A center that receives nothing yet reads 0, not a gap; the publisher, which never receives, is absent.
    Delivery.objects.filter(center=network["outsider"]).delete()
    samples = scrape(client)
    assert ("dicom_exchange_deliveries_queued", (("center", "isfahan-nuclear"),)) in samples
    assert value(samples, "dicom_exchange_deliveries_queued", center="isfahan-nuclear") == 0
    assert not [key for key in samples if ("center", "shiraz-imaging") in key[1] and "deliveries" in key[0]]


@pytest.mark.django_db
def test_each_agents_last_contact_is_its_last_heartbeat(client, keys):
    for hostname in ("pacs-gw-1", "pacs-gw-2"):
        answer = client.post(
            "/api/v1/agents/heartbeat",
            data={"version": "1.0", "hostname": hostname, "roles": ["receive"]},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {keys['partner']}",
        )
        assert answer.status_code == 200
    samples = scrape(client)
    for agent in AgentHeartbeat.objects.all():
        seen = value(
            samples,
            "dicom_exchange_agent_last_contact_timestamp_seconds",
            center="tehran-hospital",
            hostname=agent.hostname,
        )
        assert seen == pytest.approx(agent.last_seen_at.timestamp())
    assert AgentHeartbeat.objects.count() == 2


@pytest.fixture
def broker_queue():
    """A queue of this test's own on the real RabbitMQ, holding three messages."""
    name = f"dx-metrics-{uuid.uuid4().hex[:8]}"
    with Connection(BROKER_URL, connect_timeout=5) as connection:
        queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
        producer = Producer(connection.default_channel)
        for n in range(3):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, declare=[queue])
        yield name
        connection.default_channel.queue_delete(name)


@pytest.mark.django_db
def test_it_reports_the_celery_queues_depth_from_rabbitmq(client, settings, broker_queue):
    settings.CELERY_TASK_ALWAYS_EAGER = False
    settings.CELERY_BROKER_URL = BROKER_URL
    settings.CELERY_TASK_DEFAULT_QUEUE = broker_queue
    settings.CELERY_STAT_QUEUE = broker_queue + "-stat"
    samples = scrape(client)
    assert value(samples, "dicom_exchange_broker_up") == 1
    assert value(samples, "dicom_exchange_celery_queue_messages", queue=broker_queue) == 3
    assert value(samples, "dicom_exchange_celery_queue_messages", queue=broker_queue + "-stat") == 0
    # A queue no worker declared yet holds nothing.
    settings.CELERY_TASK_DEFAULT_QUEUE = broker_queue + "-never-declared"
    samples = scrape(client)
    assert value(samples, "dicom_exchange_celery_queue_messages", queue=broker_queue + "-never-declared") == 0


@pytest.mark.django_db
def test_it_answers_without_the_queue_depth_when_the_broker_is_down(client, settings):
    settings.CELERY_TASK_ALWAYS_EAGER = False
    settings.CELERY_BROKER_URL = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    samples = scrape(client)
    assert ("dicom_exchange_broker_up", ()) in samples
    assert value(samples, "dicom_exchange_broker_up") == 0
    assert not [key for key in samples if key[0] == "dicom_exchange_celery_queue_messages"]
