"""Many files per upload request: the portal's batch form of POST /api/v1/instances.

A batch is one multipart/related request; the portal answers a result per file,
so each file keeps its own outcome, and with it its own retries. Files are grouped
by count and by bytes from what is due now: a lone file goes at once, never held
back for company. Batches go `parallel` at a time over kept-alive connections, so
the next batch is read and sent while the previous one's answer is on its way.

Against a portal without the batch form (404, 405 or 415 to it) the agent falls
back to one request per file, for the rest of the run; the next run asks again.
A batch the portal failed as a whole (an HTTP 500, or a refusal of its size) is
sent again file by file in the same pass, so one file that breaks the portal
fails no other.
"""

import threading
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path

import httpx

from agent.client import RetryableStatus, check_retryable, describe, error_reason, with_retries
from agent.send import Outcome, Result, _sop_from_file, is_dicom_file, upload_file

UPLOAD_PATH = "/api/v1/instances"
MAX_FILES = 50
MAX_BYTES = 16 * 1024 * 1024
_CHUNK = 1024 * 1024
# Answers of a portal that has no batch form: it does not know the media type, or the route.
OLD_PORTAL = {404, 405, 415}
# Answers about the key or the portal as a whole, which a file-by-file retry would only repeat.
# A 502 or 504 is not among them: one file that kills the web process behind the proxy
# would fail its whole batch every time, so the batch goes again file by file.
WHOLE_BATCH = {401, 403, 429, 503}

# Kept per client, not per URL: a new run (or a test's portal on a reused port) asks again,
# and a portal upgraded meanwhile gets batches once the agent restarts.
_single_only: weakref.WeakSet[httpx.Client] = weakref.WeakSet()
_single_lock = threading.Lock()


def batches(files: list[Path], *, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES) -> list[list[Path]]:
    """`files` in order, cut into groups of at most `max_files` files and (a lone big file aside) `max_bytes`."""
    groups: list[list[Path]] = []
    current: list[Path] = []
    size = 0
    for path in files:
        try:
            length = path.stat().st_size
        except OSError:
            length = 0  # the upload reports it
        if current and (len(current) >= max_files or size + length > max_bytes):
            groups.append(current)
            current, size = [], 0
        current.append(path)
        size += length
    if current:
        groups.append(current)
    return groups


def batch_size(count: int, parallel: int) -> int:
    """Files per batch for `count` files: every connection busy, within MAX_FILES."""
    return max(1, min(MAX_FILES, -(-count // max(1, parallel))))


def batch_form_known(client: httpx.Client) -> bool:
    with _single_lock:
        return client not in _single_only


def _no_batch_form(client: httpx.Client) -> None:
    with _single_lock:
        _single_only.add(client)


def upload_batch(
    client: httpx.Client,
    paths: list[Path],
    refused: Outcome | None = None,
    *,
    priority: str | None = None,
    stop: threading.Event | None = None,
) -> list[Outcome]:
    """One attempt at each of `paths`, in one request when there are several; an outcome per file, in order.

    Never raises for an ordinary failure, like agent.send.upload_file, whose outcomes these are.
    """
    if refused is not None or len(paths) == 1 or not batch_form_known(client):
        return [upload_file(client, p, refused, attempts=1, stop=stop, priority=priority) for p in paths]
    outcomes: dict[Path, Outcome] = {}
    parts: list[tuple[Path, int]] = []
    for path in paths:
        try:
            if not is_dicom_file(path):
                outcomes[path] = Outcome(path, Result.SKIPPED, "not a DICOM file")
                continue
            parts.append((path, path.stat().st_size))
        except FileNotFoundError as exc:
            outcomes[path] = Outcome(path, Result.FAILED, exc.strerror or describe(exc), missing=True)
        except OSError as exc:
            outcomes[path] = Outcome(path, Result.FAILED, exc.strerror or describe(exc))
    if parts:
        outcomes.update(_send(client, parts, priority=priority, stop=stop))
    return [outcomes[path] for path in paths]


def _send(
    client: httpx.Client, parts: list[tuple[Path, int]], *, priority: str | None, stop: threading.Event | None
) -> dict[Path, Outcome]:
    paths = [path for path, _ in parts]
    try:
        response = with_retries(lambda: _post(client, parts, priority), f"a batch of {len(parts)}", 1, stop)
    except FileNotFoundError:
        return _one_by_one(client, paths, priority, stop)  # which one vanished is that file's own outcome
    except OSError as exc:
        return {p: Outcome(p, Result.FAILED, exc.strerror or describe(exc)) for p in paths}
    except RetryableStatus as exc:
        if exc.status_code in WHOLE_BATCH:
            return {p: Outcome(p, Result.FAILED, describe(exc), exc.status_code) for p in paths}
        return _one_by_one(client, paths, priority, stop)
    except httpx.TransportError as exc:
        return {p: Outcome(p, Result.FAILED, describe(exc), network=True) for p in paths}
    if response.status_code in OLD_PORTAL:
        _no_batch_form(client)
        return _one_by_one(client, paths, priority, stop)
    if response.status_code in WHOLE_BATCH:
        return {p: Outcome(p, Result.FAILED, error_reason(response), response.status_code) for p in paths}
    results = _results(response, len(parts))
    if results is None:
        # Refused as a whole (its size, a proxy in the way) or not understood: each file on its own.
        return _one_by_one(client, paths, priority, stop)
    return {path: _outcome(path, result) for path, result in zip(paths, results, strict=True)}


def _one_by_one(
    client: httpx.Client, paths: list[Path], priority: str | None, stop: threading.Event | None
) -> dict[Path, Outcome]:
    return {p: upload_file(client, p, attempts=1, stop=stop, priority=priority) for p in paths}


def _post(client: httpx.Client, parts: list[tuple[Path, int]], priority: str | None) -> httpx.Response:
    boundary = f"exchange-agent-{uuid.uuid4().hex}"
    heads = [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii") for _ in parts]
    tail = f"--{boundary}--\r\n".encode("ascii")
    length = sum(len(head) + size + 2 for head, (_, size) in zip(heads, parts, strict=True)) + len(tail)
    # Every file is opened before the request starts: one that vanished fails here, not mid-body.
    handles = [path.open("rb") for path, _ in parts]
    try:
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(length),
        }
        params = {"priority": priority} if priority and priority != "routine" else None
        return check_retryable(
            client.post(UPLOAD_PATH, content=_body(heads, handles, parts, tail), headers=headers, params=params)
        )
    finally:
        for handle in handles:
            handle.close()


def _body(heads, handles, parts, tail) -> Iterator[bytes]:
    for head, handle, (path, size) in zip(heads, handles, parts, strict=True):
        yield head
        sent = 0
        while chunk := handle.read(_CHUNK):
            sent += len(chunk)
            yield chunk
        if sent != size:
            # The announced length would be wrong: the request fails, and the file is retried.
            raise OSError(f"{path} changed size while it was being sent")
        yield b"\r\n"
    yield tail


def _results(response: httpx.Response, count: int) -> list[dict] | None:
    if response.status_code != 200:
        return None
    try:
        results = response.json().get("results")
    except (ValueError, AttributeError):
        return None
    if not isinstance(results, list) or len(results) != count or not all(isinstance(r, dict) for r in results):
        return None
    return results


def _outcome(path: Path, result: dict) -> Outcome:
    status = result.get("status")
    sop = result.get("sop_instance_uid")
    if status in (200, 201):
        return Outcome(
            path, Result.SENT if status == 201 else Result.ALREADY_PRESENT, f"SOP {sop}" if sop else "", status
        )
    reason = f"HTTP {status}: {result.get('error') or 'refused'}"
    sop = _sop_from_file(path)
    return Outcome(path, Result.FAILED, reason + (f" (SOP {sop})" if sop else ""), status)
