"""The Prometheus endpoint, /metrics (README "Metrics and monitoring").

Counters of what the web processes do (ingest, leases, acks) live in prometheus-client's
multi-process files when PROMETHEUS_MULTIPROC_DIR is set, so a scrape answered by any one
uvicorn worker sums every worker's. What the database already knows (each center's queue,
each agent's last contact) is read at scrape time by ExchangeCollector, never kept in a
process; the Celery queue's depth is asked of RabbitMQ, briefly and cached.

Labels carry center slugs, agent host names and outcomes, never anything about a patient.
"""

import functools
import hmac
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

logger = logging.getLogger(__name__)
# A `_created` series per counter says when this process started counting; multi-process mode
# has none, and one process among several would only mislead.
disable_created_metrics()

INGESTED = Counter(
    "dicom_exchange_ingest",
    "Uploads ingested, by result: stored (a new instance), duplicate (already stored), refused.",
    ["result"],
)
INGESTED_BYTES = Counter("dicom_exchange_ingest_bytes", "Bytes of the instances stored by ingest.")
INGEST_SECONDS = Histogram(
    "dicom_exchange_ingest_duration_seconds",
    "Time ingest took per upload, from the body received to the instance committed.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
LEASED = Counter(
    "dicom_exchange_deliveries_leased", "Deliveries handed out in leases, per receiving center.", ["center"]
)
ACKED = Counter(
    "dicom_exchange_deliveries_acked",
    "Acknowledgements, per receiving center and result: delivered, requeued (other bytes), failed, not_found.",
    ["center", "result"],
)


def observe_ingest(ingest: Callable) -> Callable:
    """Wraps routing.services.instance_ingest: counts each upload by result, and times it."""

    @functools.wraps(ingest)
    def observed(**kwargs):
        from routing.services import IngestError

        started = time.perf_counter()
        try:
            result = ingest(**kwargs)
        except IngestError:
            INGESTED.labels("refused").inc()
            raise
        finally:
            INGEST_SECONDS.observe(time.perf_counter() - started)
        if result.created:
            INGESTED.labels("stored").inc()
            INGESTED_BYTES.inc(result.instance.size)
        else:
            INGESTED.labels("duplicate").inc()
        return result

    return observed


def count_leases(lease: Callable) -> Callable:
    """Wraps routing.delivery_services.deliveries_lease: counts the deliveries handed out."""

    @functools.wraps(lease)
    def counted(*, center, **kwargs):
        leased = lease(center=center, **kwargs)
        if leased:
            LEASED.labels(center.slug).inc(len(leased))
        return leased

    return counted


def count_acks(ack: Callable) -> Callable:
    """Wraps routing.delivery_services.deliveries_ack: counts each acknowledgement by its outcome."""

    @functools.wraps(ack)
    def counted(*, center, **kwargs):
        outcomes = ack(center=center, **kwargs)
        for outcome in outcomes:
            ACKED.labels(center.slug, outcome.status).inc()
        return outcomes

    return counted


class ExchangeCollector:
    """What the database and the broker know, read when Prometheus scrapes."""

    def collect(self) -> Iterator[Metric]:
        yield from self._deliveries()
        yield from self._agents()
        yield from self._celery_queue()

    def _deliveries(self) -> Iterator[Metric]:
        from django.db.models import Count, Min

        from centers.models import Center
        from routing.models import Delivery

        Status = Delivery.Status
        gauges = {
            Status.QUEUED: GaugeMetricFamily(
                "dicom_exchange_deliveries_queued", "Deliveries waiting for the center's agent.", labels=["center"]
            ),
            Status.LEASED: GaugeMetricFamily(
                "dicom_exchange_deliveries_in_flight",
                "Deliveries leased to the center's agent, not yet acknowledged.",
                labels=["center"],
            ),
            Status.FAILED: GaugeMetricFamily(
                "dicom_exchange_deliveries_failed",
                "Deliveries failed for good, waiting for an administrator's retry.",
                labels=["center"],
            ),
        }
        oldest_age = GaugeMetricFamily(
            "dicom_exchange_deliveries_oldest_queued_age_seconds",
            "Age of the center's oldest queued delivery; 0 when none waits.",
            labels=["center"],
        )
        # Two queries: every center that receives (zeros included, so an empty queue is a 0 and not
        # a gap), and the open deliveries grouped; delivered rows, the bulk, are never scanned.
        centers = list(Center.objects.filter(may_subscribe=True).order_by("slug").values_list("slug", flat=True))
        rows = (
            Delivery.objects.filter(status__in=list(gauges))
            .values("center__slug", "status")
            .annotate(count=Count("id"), oldest=Min("created_at"))
            .order_by()
        )
        counts = {(row["center__slug"], row["status"]): row for row in rows}
        now = timezone.now()
        for slug in sorted(set(centers) | {center for center, _ in counts}):
            for status, gauge in gauges.items():
                row = counts.get((slug, status))
                gauge.add_metric([slug], row["count"] if row else 0)
            queued = counts.get((slug, Status.QUEUED))
            oldest_age.add_metric([slug], max(0.0, (now - queued["oldest"]).total_seconds()) if queued else 0.0)
        yield from gauges.values()
        yield oldest_age

    def _agents(self) -> Iterator[Metric]:
        from centers.models import AgentHeartbeat

        last_contact = GaugeMetricFamily(
            "dicom_exchange_agent_last_contact_timestamp_seconds",
            "When each site agent last sent a heartbeat (Unix time).",
            labels=["center", "hostname"],
        )
        for slug, hostname, seen in AgentHeartbeat.objects.values_list("center__slug", "hostname", "last_seen_at"):
            last_contact.add_metric([slug, hostname], seen.timestamp())
        yield last_contact

    def _celery_queue(self) -> Iterator[Metric]:
        if settings.CELERY_TASK_ALWAYS_EAGER:
            return  # No broker: tasks run in the web process.
        depths: dict[str, int] = {}
        for queue in (settings.CELERY_TASK_DEFAULT_QUEUE, settings.CELERY_STAT_QUEUE):
            depth = celery_queue_depth(queue)
            if depth is None:
                break  # the broker does not answer: asking it about the next queue would only hold the scrape
            depths[queue] = depth
        up = GaugeMetricFamily("dicom_exchange_broker_up", "1 when RabbitMQ answered the last queue-depth question.")
        up.add_metric([], 1 if len(depths) == 2 else 0)
        yield up
        if depths:
            gauge = GaugeMetricFamily(
                "dicom_exchange_celery_queue_messages", "Tasks waiting in the Celery queue.", labels=["queue"]
            )
            for queue, depth in depths.items():
                gauge.add_metric([queue], depth)
            yield gauge


_depth_lock = threading.Lock()
_depth_cache: dict[str, tuple[float, int | None]] = {}


def celery_queue_depth(queue: str) -> int | None:
    """Messages ready in the queue, from a passive declare; None when the broker does not answer.

    Cached for METRICS_BROKER_CACHE_SECONDS, so scrapes from several Prometheus servers cost the
    broker one question; each connection attempt is bounded by METRICS_BROKER_TIMEOUT.
    """
    with _depth_lock:
        cached = _depth_cache.get(queue)
        if cached is not None and time.monotonic() - cached[0] < settings.METRICS_BROKER_CACHE_SECONDS:
            return cached[1]
        depth = _ask_broker(queue)
        _depth_cache[queue] = (time.monotonic(), depth)
        return depth


def _ask_broker(queue: str) -> int | None:
    from amqp.exceptions import NotFound
    from kombu import Connection

    timeout = settings.METRICS_BROKER_TIMEOUT
    try:
        with Connection(
            settings.CELERY_BROKER_URL,
            connect_timeout=timeout,
            transport_options={"read_timeout": timeout, "write_timeout": timeout},
        ) as connection:
            # At most two quick attempts: a broker that is down must not hold the scrape.
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
            channel = connection.channel()
            _, messages, _ = channel.queue_declare(queue=queue, passive=True)
            return messages
    except NotFound:
        return 0  # Not declared yet: no worker has started and nothing was published to it.
    except Exception as exc:
        logger.warning("metrics: the Celery queue's depth is unknown (%s: %s)", type(exc).__name__, exc)
        return None


class _DefaultRegistry:
    """The process's own metrics, for a portal run without PROMETHEUS_MULTIPROC_DIR (one process)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def metrics_text() -> bytes:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_DefaultRegistry())
    registry.register(ExchangeCollector())
    return generate_latest(registry)


def _address_allowed(address: str | None) -> bool:
    if not address or not settings.METRICS_ALLOWED_ADDRESSES:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in _allowed_networks(tuple(settings.METRICS_ALLOWED_ADDRESSES)))


@functools.cache
def _allowed_networks(addresses: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(address, strict=False) for address in addresses]


def _token_given(request: HttpRequest) -> bool:
    if not settings.METRICS_TOKEN:
        return False
    scheme, _, token = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), settings.METRICS_TOKEN.encode())


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Operators' scrapes only: the bearer token METRICS_TOKEN, or an address in METRICS_ALLOWED_ADDRESSES."""
    if request.method not in ("GET", "HEAD"):
        return HttpResponse("GET only.\n", status=405, content_type="text/plain", headers={"Allow": "GET, HEAD"})
    if not (_token_given(request) or _address_allowed(request.META.get("REMOTE_ADDR"))):
        if settings.METRICS_TOKEN:
            return HttpResponse(
                "A bearer token is needed.\n",
                status=401,
                content_type="text/plain",
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
        return HttpResponse(
            "Metrics are served to METRICS_TOKEN or METRICS_ALLOWED_ADDRESSES only.\n",
            status=403,
            content_type="text/plain",
        )
    # The classic text format (what generate_latest writes), which Prometheus 2 (Debian's) reads.
    return HttpResponse(metrics_text(), content_type=CONTENT_TYPE_PLAIN_0_0_4)
