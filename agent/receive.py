"""`receive`: lease deliveries, place each file safely in the inbox, then acknowledge it."""

import enum
import fcntl
import logging
import os
import re
import shutil
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from tqdm import tqdm

from agent.atomic import (
    ChecksumMismatch,
    make_dirs,
    remove_partials,
    rename_durable,
    sha256_of,
    sync_folders,
    write_verified,
)
from agent.client import (
    RateLimited,
    RetryableStatus,
    backoff_delay,
    check_retryable,
    describe,
    error_reason,
    with_retries,
)
from agent.forward import Forwarder, ForwardError
from agent.paths import UnsafePathError, delivery_path, study_folder
from agent.state import State

log = logging.getLogger(__name__)

DOWNLOAD_WORKERS = 4
IDLE_BACKOFF_BASE_SECONDS = 1.0
IDLE_BACKOFF_CAP_SECONDS = 30.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
INBOX_LOCK = ".exchange-agent.lock"
# Whole studies (deliver: study) are downloaded under here, one folder per lease, and moved
# into the inbox once all of the lease's files of the study are in. Hidden, so a PACS import
# watching the inbox never sees them; on the inbox's file system, so the move is a rename.
STAGING = ".staging"
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
        log.warning("removed %s, left half-written by an earlier run (that delivery was never acknowledged)", path.name)
    staging = inbox / STAGING
    if staging.exists():
        # What a killed run staged was never acknowledged: the portal offers it again.
        log.warning("removed %s, whole studies an earlier run had not finished (never acknowledged)", staging)
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class Delivery:
    id: str
    sop_instance_uid: str
    sha256: str
    download_url: str
    fields: dict[str, Any]

    @property
    def whole_study(self) -> bool:
        return self.fields.get("deliver") == "study"

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
            for item, result in zip(fresh, handle_batch(client, target, pool, fresh), strict=True):
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
        batch: list[object] = []
        with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS) as pool, ThreadPoolExecutor(max_workers=1) as leaser:
            while not self.stop.is_set():
                try:
                    if not batch:
                        batch = lease(self.client, self.limit, self.wait)
                        if self.stop.is_set():
                            break  # stopping: the leases expire and the portal queues them again
                    # A full lease suggests more is queued: lease the next one while this one
                    # downloads, so the download threads never wait for the portal.
                    ahead = leaser.submit(lease, self.client, self.limit, 0) if len(batch) >= self.limit else None
                    with self.busy:
                        results = handle_batch(self.client, self.target, pool, batch)
                    batch = ahead.result() if ahead is not None else []
                    ok = Result.FAILED not in results
                except RateLimited as exc:
                    # Not trouble: the portal said how long to wait, and that is all.
                    log.warning("the portal asks this agent to slow down; leasing again in %.1f s", exc.retry_after)
                    batch = []
                    self.stop.wait(exc.retry_after)
                    continue
                except (httpx.HTTPError, RetryableStatus, LeaseError) as exc:
                    log.warning("cannot lease deliveries: %s", describe(exc))
                    batch = []
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


@dataclass(frozen=True)
class Placed:
    """A delivery whose file is in the inbox (and the PACS), waiting for its acknowledgement.

    A delivery of a whole study is first `staged`: its file waits in the staging folder
    until the rest of its study is in.
    """

    delivery: Delivery
    dest: Path
    present: bool
    staged: Path | None = None


def handle_batch(client: httpx.Client, target: Target, pool: ThreadPoolExecutor, batch: list[object]) -> list[Result]:
    """Place a lease's deliveries in parallel, then acknowledge the placed ones in one request."""
    staging = target.inbox / STAGING / uuid.uuid4().hex
    try:
        placed = _synced(list(pool.map(lambda item: place(client, target, item, staging), batch)))
        placed = place_studies(target, staging, batch, placed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    acked = acknowledge(client, target, [p for p in placed if isinstance(p, Placed)])
    return [acked.get(p.delivery.id, Result.FAILED) if isinstance(p, Placed) else p for p in placed]


def _synced(placed: list[Placed | Result]) -> list[Placed | Result]:
    """`placed`, once the folders its downloads were renamed into are synced: a file is durable before its ack.

    A download does not sync its folder itself, so a lease of many files in one series
    costs one folder fsync rather than one a file.
    """
    written = [p for p in placed if isinstance(p, Placed) and not p.present]
    try:
        sync_folders({(p.staged or p.dest).parent for p in written})
    except OSError as exc:
        log.error("cannot sync the inbox: %s; %d file(s) not acknowledged", describe(exc), len(written))
        return [Result.FAILED if isinstance(p, Placed) and not p.present else p for p in placed]
    return placed


def place(client: httpx.Client, target: Target, item: object, staging: Path) -> Placed | Result:
    """Put one delivery's file in place (staged, for a whole study); on failure log why and return Result.FAILED."""
    try:
        delivery = Delivery.parse(item)
        if delivery.whole_study:
            return _stage(client, target, delivery, staging)
        return _place(client, target, delivery)
    except (DeliveryError, UnsafePathError, httpx.HTTPError, RetryableStatus, ForwardError) as exc:
        log.error("%s: %s; not acknowledged", _label(item), describe(exc))
    except OSError as exc:
        log.error("%s: cannot write to the inbox: %s; not acknowledged", _label(item), describe(exc))
    except Exception:  # one bad delivery must not stop an unattended agent
        log.exception("%s: unexpected error; not acknowledged", _label(item))
    return Result.FAILED


def _what(delivery: Delivery) -> str:
    return f"SOP {delivery.sop_instance_uid} (delivery {delivery.id})"


def _place(client: httpx.Client, target: Target, delivery: Delivery) -> Placed:
    what = _what(delivery)
    dest, present = _destination(target.inbox, delivery)
    if not present:
        try:
            with_retries(lambda: _download(client, delivery, dest), f"{what}: download")
        except ChecksumMismatch as exc:
            raise _ack_mismatch(client, delivery, exc) from exc
        log.info("%s: received into the inbox as %s", what, dest.name)
    if target.forwarder is not None:
        # Before the ack: until the PACS has it, the portal keeps the delivery queued for us.
        target.forwarder.store(dest, what)
        log.info("%s: forwarded to %s", what, target.forwarder.peer)
    return Placed(delivery, dest, present)


def _stage(client: httpx.Client, target: Target, delivery: Delivery, staging: Path) -> Placed:
    """Download one file of a whole study into the staging folder, where its final path will be."""
    dest, present = _destination(target.inbox, delivery)
    if present:
        return Placed(delivery, dest, True)
    staged = staging / dest.relative_to(target.inbox)
    try:
        with_retries(lambda: _download(client, delivery, staged), f"{_what(delivery)}: download")
    except ChecksumMismatch as exc:
        raise _ack_mismatch(client, delivery, exc) from exc
    return Placed(delivery, dest, False, staged)


def place_studies(
    target: Target, staging: Path, batch: list[object], placed: list[Placed | Result]
) -> list[Placed | Result]:
    """Move each whole study of a lease into the inbox once all of its files are staged.

    A study one of whose files failed is not placed at all: its staged files are
    dropped and left unacknowledged, so the portal offers the study again. A study new
    to the inbox appears in one rename of its folder; one already there (a later
    delivery of it) gets its new files one rename each.
    """
    studies: dict[tuple[str, str], list[int]] = {}
    for index, item in enumerate(batch):
        if isinstance(item, dict) and item.get("deliver") == "study":
            studies.setdefault(study_folder(item), []).append(index)
    result = list(placed)
    for folder, members in studies.items():
        if any(not isinstance(placed[i], Placed) for i in members):
            for i in members:
                if isinstance(placed[i], Placed):
                    log.error("%s: not placed: another file of its study failed", _what(placed[i].delivery))
                    result[i] = Result.FAILED
            continue
        try:
            _move_study(target, staging, folder, [placed[i] for i in members])
        except OSError as exc:
            log.error("study folder %s: cannot move it into the inbox: %s; not acknowledged", folder[1], describe(exc))
            for i in members:
                result[i] = Result.FAILED
            continue
        for i in members:
            result[i] = _forward_placed(target, placed[i])
    return result


def _move_study(target: Target, staging: Path, folder: tuple[str, str], members: list[Placed]) -> None:
    staged = [p for p in members if p.staged is not None]
    if not staged:
        return
    dest = target.inbox.joinpath(*folder)
    if not dest.exists():
        make_dirs(dest.parent)
        rename_durable(staging.joinpath(*folder), dest)
    else:
        for item in staged:
            make_dirs(item.dest.parent)
            rename_durable(item.staged, item.dest)
    log.info("study %s: %d file(s) placed in the inbox", dest.name, len(staged))


def _forward_placed(target: Target, placed: Placed) -> Placed | Result:
    if target.forwarder is None:
        return placed
    what = _what(placed.delivery)
    try:
        target.forwarder.store(placed.dest, what)
    except ForwardError as exc:
        log.error("%s: %s; not acknowledged", what, describe(exc))
        return Result.FAILED
    log.info("%s: forwarded to %s", what, target.forwarder.peer)
    return placed


def acknowledge(client: httpx.Client, target: Target, placed: list[Placed]) -> dict[str, Result]:
    """Acknowledge placed deliveries, a lease at a time; what is not acknowledged the portal re-queues."""
    if not placed:
        return {}
    try:
        answers = _ack_many(client, placed)
    except (httpx.HTTPError, RetryableStatus, DeliveryError) as exc:
        for item in placed:
            log.error("%s: file is in place but the ack failed: %s", _what(item.delivery), describe(exc))
        return {item.delivery.id: Result.FAILED for item in placed}
    results = {}
    for item in placed:
        answer = answers.get(item.delivery.id, {"status": "missing", "error": "the portal did not answer for it"})
        if answer.get("status") != "delivered":
            log.error(
                "%s: file is in place but the ack was refused: %s",
                _what(item.delivery),
                answer.get("error") or answer.get("status"),
            )
            results[item.delivery.id] = Result.FAILED
            continue
        if target.forwarder is not None and not target.keep_inbox:
            item.dest.unlink(missing_ok=True)
        if item.present:
            log.info("%s: already present in the inbox as %s", _what(item.delivery), item.dest.name)
        results[item.delivery.id] = Result.ALREADY_PRESENT if item.present else Result.RECEIVED
    # Once a lease, not once a file: it rewrites state.json, and only `status` reads it.
    if any(result is not Result.FAILED for result in results.values()):
        target.state.record("receive")
    return results


def _ack_many(client: httpx.Client, placed: list[Placed]) -> dict[str, dict]:
    """{delivery id: the portal's answer}; one request per lease, or one per delivery on an older portal."""
    body = {"acks": [{"id": _numeric_id(p.delivery.id), "sha256": p.delivery.sha256} for p in placed]}
    response = with_retries(
        lambda: check_retryable(client.post("/api/v1/deliveries/ack", json=body)), f"ack of {len(placed)} deliveries"
    )
    if response.status_code in (404, 405):
        answers = {}
        for item in placed:
            single = _ack(client, item.delivery, item.delivery.sha256)
            answers[item.delivery.id] = (
                {"status": "delivered"} if single.status_code == 200 else {"error": error_reason(single)}
            )
        return answers
    if response.status_code != 200:
        raise DeliveryError(error_reason(response))
    try:
        return {str(answer["id"]): answer for answer in response.json()["results"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise DeliveryError("the portal's answer to the acknowledgements is malformed") from exc


def _numeric_id(delivery_id: str) -> int | str:
    return int(delivery_id) if delivery_id.isdigit() else delivery_id


def _destination(inbox: Path, delivery: Delivery) -> tuple[Path, bool]:
    """Where the file goes, and whether it is already there with the right bytes."""
    dest = delivery_path(inbox, delivery.fields)
    if dest.exists():
        if sha256_of(dest) == delivery.sha256:
            return dest, True
        # Never overwrite different bytes: sanitised names can collide, and the existing
        # file may be someone's only copy.
        taken, dest = dest, dest.with_name(f"{dest.stem}.{delivery.sha256[:16]}.dcm")
        log.warning("%s exists with other content; writing %s beside it", taken.name, dest.name)
        if dest.exists() and sha256_of(dest) == delivery.sha256:
            return dest, True
    return dest, False


def _download_request(client: httpx.Client, url: str) -> httpx.Request:
    """The GET of a download URL; the center key goes only to the portal's own origin.

    A URL on another origin (a presigned S3 URL) carries its own signature and
    must never see the key.
    """
    request = client.build_request("GET", url)
    target, portal = httpx.URL(url), client.base_url
    if (target.scheme, target.host, target.port) != (portal.scheme, portal.host, portal.port):
        for private in ("Authorization", "Cookie"):
            request.headers.pop(private, None)
    return request


def _download(client: httpx.Client, delivery: Delivery, dest: Path) -> str:
    response = client.send(_download_request(client, delivery.download_url), stream=True)
    try:
        check_retryable(response)
        if response.status_code != 200:
            response.read()
            raise DeliveryError(f"download refused: {error_reason(response)}")
        size = int(response.headers.get("Content-Length") or 0)
        if not (sys.stderr.isatty() and size >= PROGRESS_MIN_BYTES):
            return write_verified(dest, response.iter_bytes(), delivery.sha256, sync_folder=False)
        with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name[:24], file=sys.stderr) as bar:
            return write_verified(dest, _counted(response.iter_bytes(), bar), delivery.sha256, sync_folder=False)
    finally:
        response.close()


def _counted(chunks: Iterable[bytes], bar: tqdm) -> Iterator[bytes]:
    for chunk in chunks:
        bar.update(len(chunk))
        yield chunk


def _ack(client: httpx.Client, delivery: Delivery, digest: str) -> httpx.Response:
    url = f"/api/v1/deliveries/{quote(delivery.id, safe='')}/ack"
    return with_retries(
        lambda: check_retryable(client.post(url, json={"sha256": digest})), f"delivery {delivery.id}: ack"
    )


def _ack_mismatch(client: httpx.Client, delivery: Delivery, mismatch: ChecksumMismatch) -> DeliveryError:
    """Report the hash that arrived, as the contract asks; the portal answers 409 and queues it
    again, or fails it for good after too many mismatches: its answer says which."""
    response = _ack(client, delivery, mismatch.actual)
    if response.status_code == 409:
        return DeliveryError(f"{mismatch}; file discarded; the portal says: {error_reason(response)}")
    if response.status_code == 200:
        return DeliveryError(
            f"{mismatch}; file discarded, yet the portal accepted the ack: this image may be missing here"
        )
    return DeliveryError(f"{mismatch}; file discarded, and the ack was refused: {error_reason(response)}")
