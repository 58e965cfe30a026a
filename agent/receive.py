"""`receive`: lease deliveries, place each file safely in the inbox, then acknowledge it."""

import enum
import fcntl
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from tqdm import tqdm

from agent.atomic import ChecksumMismatch, remove_partials, sha256_of, write_verified
from agent.client import RetryableStatus, backoff_delay, check_retryable, describe, error_reason, with_retries
from agent.forward import Forwarder, ForwardError
from agent.paths import UnsafePathError, delivery_path
from agent.state import State

log = logging.getLogger(__name__)

DOWNLOAD_WORKERS = 4
IDLE_BACKOFF_BASE_SECONDS = 1.0
IDLE_BACKOFF_CAP_SECONDS = 30.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
INBOX_LOCK = ".exchange-agent.lock"
# Downloads at least this large show a progress bar when the agent runs in a terminal.
PROGRESS_MIN_BYTES = 16 * 1024 * 1024


class Result(enum.Enum):
    RECEIVED = "received"
    ALREADY_PRESENT = "already present"
    FAILED = "failed"


class DeliveryError(Exception):
    """This delivery could not be completed; it stays unacknowledged and the portal re-queues it."""


class LeaseError(Exception):
    """The portal refused to hand out deliveries."""


@dataclass(frozen=True)
class Target:
    """Where deliveries go: the inbox, and optionally on to the local PACS."""

    inbox: Path
    forwarder: Forwarder | None = None
    # With forwarding, whether the inbox copy stays once the PACS has the instance.
    keep_inbox: bool = True
    state: State = field(default_factory=lambda: State(None))


_inbox_locks: list[int] = []


def prepare_inbox(inbox: Path) -> None:
    """Claim the inbox for this process and remove what a killed receiver left half-written.

    Another agent already receiving into the same folder keeps its partial files: only
    the holder of the lock may remove them.
    """
    try:
        fd = os.open(inbox / INBOX_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        # Not fatal here: every delivery then fails with the same clear error and stays queued.
        log.error("cannot write to the inbox %s: %s", inbox, exc.strerror or exc)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        log.warning("another agent process is receiving into %s; leaving its partial files alone", inbox)
        return
    _inbox_locks.append(fd)  # held until the process ends; the kernel releases it even after SIGKILL
    for path in remove_partials(inbox):
        log.warning("removed %s, left half-written by an earlier run (that delivery was never acknowledged)", path)


@dataclass(frozen=True)
class Delivery:
    id: str
    sop_instance_uid: str
    sha256: str
    download_url: str
    fields: dict[str, Any]

    @classmethod
    def parse(cls, item: object) -> "Delivery":
        if not isinstance(item, dict):
            raise DeliveryError(f"malformed delivery {item!r}")
        sha256 = str(item.get("sha256", "")).lower()
        if item.get("id") is None or not _SHA256.fullmatch(sha256) or not isinstance(item.get("download_url"), str):
            raise DeliveryError(f"malformed delivery {item!r}")
        return cls(str(item["id"]), str(item.get("sop_instance_uid")), sha256, item["download_url"], item)


def receive_once(client: httpx.Client, target: Target, limit: int) -> tuple[int, str]:
    """Drain the queue and return (exit status, summary line)."""
    counts = dict.fromkeys(Result, 0)
    # A failed delivery is re-queued and could come straight back; skipping it (its lease then
    # expires) is what lets the drain end.
    failed: set[str] = set()
    lease_failed = False
    with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS) as pool:
        while True:
            try:
                batch = with_retries(lambda: lease(client, limit, 0), "lease")
            except (httpx.HTTPError, RetryableStatus, LeaseError) as exc:
                log.error("cannot lease deliveries: %s", describe(exc))
                lease_failed = True
                break
            if not batch:
                break
            fresh = [item for item in batch if _item_id(item) not in failed]
            for item, result in zip(fresh, pool.map(lambda i: handle(client, target, i), fresh), strict=False):
                counts[result] += 1
                if result is Result.FAILED:
                    failed.add(_item_id(item))
    summary = ", ".join(f"{counts[r]} {r.value}" for r in Result)
    return (1 if lease_failed or counts[Result.FAILED] else 0), summary


class Receiver:
    """Long-polls and handles deliveries until `stop` is set; rides out portal and network outages."""

    def __init__(self, client: httpx.Client, target: Target, *, limit: int, wait: int, stop: threading.Event) -> None:
        self.client = client
        self.target = target
        self.limit = limit
        self.wait = wait
        self.stop = stop
        # Held while a batch is handled, so shutdown lets it finish; an idle long poll is simply
        # abandoned (whatever it leases then expires and is queued again).
        self.busy = threading.Lock()

    def run(self) -> None:
        trouble = 0  # consecutive rounds that went wrong, for the back-off
        with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS) as pool:
            while not self.stop.is_set():
                try:
                    batch = lease(self.client, self.limit, self.wait)
                    if self.stop.is_set():
                        break  # stopping: the leases expire and the portal queues them again
                    with self.busy:
                        results = list(pool.map(lambda i: handle(self.client, self.target, i), batch))
                    ok = Result.FAILED not in results
                except (httpx.HTTPError, RetryableStatus, LeaseError) as exc:
                    log.warning("cannot lease deliveries: %s", describe(exc))
                    ok = False
                trouble = 0 if ok else trouble + 1
                if trouble:
                    # Also after failed deliveries: the portal re-queues them, and retrying
                    # without a pause would spin on a persistent fault.
                    delay = backoff_delay(trouble - 1, IDLE_BACKOFF_BASE_SECONDS, IDLE_BACKOFF_CAP_SECONDS)
                    log.info("pausing %.1f s before leasing again", delay)
                    self.stop.wait(delay)


def _label(item: object) -> str:
    sop = item.get("sop_instance_uid") if isinstance(item, dict) else None
    return f"SOP {sop} (delivery {_item_id(item)})" if sop else f"delivery {_item_id(item)}"


def _item_id(item: object) -> str:
    return str(item.get("id")) if isinstance(item, dict) else repr(item)


def lease(client: httpx.Client, limit: int, wait: int) -> list[object]:
    """Lease up to `limit` deliveries, letting the portal hold the request up to `wait` seconds."""
    # The read timeout outlasts the long poll, which is not a stall.
    timeout = httpx.Timeout(30.0, read=wait + 30.0)
    params = {"limit": limit, "wait": wait}
    response = check_retryable(client.get("/api/v1/deliveries", params=params, timeout=timeout))
    if response.status_code != 200:
        raise LeaseError(error_reason(response))
    try:
        batch = response.json()
    except ValueError as exc:
        raise LeaseError("the portal's answer is not JSON") from exc
    if not isinstance(batch, list):
        raise LeaseError("the portal's answer is not a list of deliveries")
    return batch


def handle(client: httpx.Client, target: Target, item: object) -> Result:
    """Place one delivery in the inbox (and the PACS) and acknowledge it; log and return what happened."""
    try:
        delivery = Delivery.parse(item)
        result = _place_and_ack(client, target, delivery)
    except (DeliveryError, UnsafePathError, httpx.HTTPError, RetryableStatus, ForwardError) as exc:
        log.error("%s: %s; not acknowledged", _label(item), describe(exc))
        return Result.FAILED
    except OSError as exc:
        log.error("%s: cannot write to the inbox: %s; not acknowledged", _label(item), describe(exc))
        return Result.FAILED
    except Exception:  # one bad delivery must not stop an unattended agent
        log.exception("%s: unexpected error; not acknowledged", _label(item))
        return Result.FAILED
    return result


def _place_and_ack(client: httpx.Client, target: Target, delivery: Delivery) -> Result:
    what = f"SOP {delivery.sop_instance_uid} (delivery {delivery.id})"
    dest, present = _destination(target.inbox, delivery)
    if not present:
        _check_origin(client, delivery.download_url)
        try:
            with_retries(lambda: _download(client, delivery, dest), f"{what}: download")
        except ChecksumMismatch as exc:
            raise _ack_mismatch(client, delivery, exc) from exc
        log.info("%s: received into %s", what, dest)
    if target.forwarder is not None:
        # Before the ack: until the PACS has it, the portal keeps the delivery queued for us.
        target.forwarder.store(dest, what)
        log.info("%s: forwarded to %s", what, target.forwarder.peer)
    _ack_placed(client, delivery, delivery.sha256)
    target.state.record("receive")
    if target.forwarder is not None and not target.keep_inbox:
        dest.unlink(missing_ok=True)
    if present:
        log.info("%s: already present at %s", what, dest)
        return Result.ALREADY_PRESENT
    return Result.RECEIVED


def _destination(inbox: Path, delivery: Delivery) -> tuple[Path, bool]:
    """Where the file goes, and whether it is already there with the right bytes."""
    dest = delivery_path(inbox, delivery.fields)
    if dest.exists():
        if sha256_of(dest) == delivery.sha256:
            return dest, True
        # Never overwrite different bytes: sanitised names can collide, and the existing
        # file may be someone's only copy.
        taken, dest = dest, dest.with_name(f"{dest.stem}.{delivery.sha256[:16]}.dcm")
        log.warning("%s exists with other content; writing %s beside it", taken, dest.name)
        if dest.exists() and sha256_of(dest) == delivery.sha256:
            return dest, True
    return dest, False


def _check_origin(client: httpx.Client, url: str) -> None:
    # The center key goes with every request; never hand it to a host other than the portal.
    target, portal = httpx.URL(url), client.base_url
    if (target.scheme, target.host, target.port) != (portal.scheme, portal.host, portal.port):
        raise DeliveryError(
            f"download_url {url} is not on the configured server {portal};"
            " check the portal's allowed hosts and proxy settings"
        )


def _download(client: httpx.Client, delivery: Delivery, dest: Path) -> str:
    with client.stream("GET", delivery.download_url) as response:
        check_retryable(response)
        if response.status_code != 200:
            response.read()
            raise DeliveryError(f"download refused: {error_reason(response)}")
        size = int(response.headers.get("Content-Length") or 0)
        show = sys.stderr.isatty() and size >= PROGRESS_MIN_BYTES
        with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name[:24], file=sys.stderr, disable=not show) as bar:
            return write_verified(dest, _counted(response.iter_bytes(), bar), delivery.sha256)


def _counted(chunks: Iterable[bytes], bar: tqdm) -> Iterator[bytes]:
    for chunk in chunks:
        bar.update(len(chunk))
        yield chunk


def _ack(client: httpx.Client, delivery: Delivery, digest: str) -> httpx.Response:
    url = f"/api/v1/deliveries/{quote(delivery.id, safe='')}/ack"
    return with_retries(
        lambda: check_retryable(client.post(url, json={"sha256": digest})), f"delivery {delivery.id}: ack"
    )


def _ack_placed(client: httpx.Client, delivery: Delivery, digest: str) -> None:
    response = _ack(client, delivery, digest)
    if response.status_code != 200:
        reason = error_reason(response)
        raise DeliveryError(f"file is in place but the ack was refused: {reason}")


def _ack_mismatch(client: httpx.Client, delivery: Delivery, mismatch: ChecksumMismatch) -> DeliveryError:
    """Report the hash that arrived, as the contract asks; the portal answers 409 and re-queues."""
    response = _ack(client, delivery, mismatch.actual)
    if response.status_code == 409:
        return DeliveryError(f"{mismatch}; file discarded, the portal re-queued it")
    if response.status_code == 200:
        return DeliveryError(
            f"{mismatch}; file discarded, yet the portal accepted the ack: this image may be missing here"
        )
    return DeliveryError(f"{mismatch}; file discarded, and the ack was refused: {error_reason(response)}")
