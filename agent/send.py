"""`send`: upload DICOM files and folders to the portal."""

import contextlib
import enum
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from agent.client import (
    RETRY_ATTEMPTS,
    RetryableStatus,
    backoff_delay,
    check_retryable,
    describe,
    error_reason,
    with_retries,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

_PREAMBLE = 128
_MAGIC = b"DICM"
# Answers that refuse this center as a whole: every further upload would get the same.
_REFUSES_CENTER = {401, 403}


class Result(enum.Enum):
    SENT = "sent"
    ALREADY_PRESENT = "already present"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    path: Path
    result: Result
    detail: str = ""
    status_code: int | None = None
    # No answer came: the connection failed or broke (as opposed to the portal answering, or a local error).
    network: bool = False
    # The file vanished before or while it was read.
    missing: bool = False

    @property
    def may_pass_later(self) -> bool:
        """A failure that a later attempt may not repeat: no answer, or a 5xx/429."""
        return self.result is Result.FAILED and (
            self.network or (self.status_code or 0) >= 500 or self.status_code == 429
        )


def is_dicom_file(path: Path) -> bool:
    """True when the file starts like DICOM Part-10: a 128-byte preamble, then b"DICM"."""
    with path.open("rb") as f:
        head = f.read(_PREAMBLE + len(_MAGIC))
    return head[_PREAMBLE:] == _MAGIC


def discover_files(paths: Iterable[Path]) -> list[Path]:
    """Expand folders recursively into their files, in a stable sorted order, each file once.

    Hidden entries (".name") inside folders are left out: they are OS clutter or, like the
    receiver's ".part" files, incomplete. Paths named explicitly are kept even if missing,
    so the upload reports them as failed.
    """
    found: dict[Path, Path] = {}
    for path in paths:
        candidates = _walk(path) if path.is_dir() else [path]
        for candidate in candidates:
            found.setdefault(candidate.resolve(), candidate)
    return list(found.values())


def _walk(folder: Path) -> list[Path]:
    files = []
    # os.walk does not follow symlinked folders, so a link loop cannot trap it.
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root, name) for name in sorted(names) if not name.startswith("."))
    return files


def upload_file(
    client: httpx.Client,
    path: Path,
    refused: Outcome | None = None,
    *,
    attempts: int = RETRY_ATTEMPTS,
    stop: threading.Event | None = None,
    priority: str | None = None,
) -> Outcome:
    """Upload one file, trying up to `attempts` times; never raises for an ordinary failure.

    `refused` is an earlier upload the portal refused for the whole center; DICOM files
    are then failed without a request. A 429 waits as the portal asks and is not an attempt.
    """
    try:
        if not is_dicom_file(path):
            return Outcome(path, Result.SKIPPED, "not a DICOM file")
        if refused:
            reason = f"not sent, the portal refused {refused.path}: {refused.detail}"
            return Outcome(path, Result.FAILED, reason)
        response = with_retries(lambda: _post(client, path, priority), f"{path}: upload", attempts, stop)
    except FileNotFoundError as exc:
        return Outcome(path, Result.FAILED, exc.strerror or describe(exc), missing=True)
    except OSError as exc:
        return Outcome(path, Result.FAILED, exc.strerror or describe(exc))
    except RetryableStatus as exc:
        return Outcome(path, Result.FAILED, describe(exc), exc.status_code)
    except httpx.TransportError as exc:
        return Outcome(path, Result.FAILED, describe(exc), network=True)
    if response.status_code in (200, 201):
        result = Result.SENT if response.status_code == 201 else Result.ALREADY_PRESENT
        return Outcome(path, result, _sop_from_answer(response), response.status_code)
    sop = _sop_from_file(path)
    reason = error_reason(response) + (f" (SOP {sop})" if sop else "")
    return Outcome(path, Result.FAILED, reason, response.status_code)


def _post(client: httpx.Client, path: Path, priority: str | None = None) -> httpx.Response:
    # Reopened on every attempt so a retry starts from byte 0; httpx streams the file
    # object in chunks rather than reading it whole.
    with path.open("rb") as body:
        size = os.fstat(body.fileno()).st_size
        headers = {"Content-Type": "application/dicom", "Content-Length": str(size)}
        # Routine is the portal's default: a routine upload's request is the same as before.
        params = {"priority": priority} if priority and priority != "routine" else None
        return check_retryable(client.post("/api/v1/instances", content=body, headers=headers, params=params))


def _sop_from_answer(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    sop = body.get("sop_instance_uid") if isinstance(body, dict) else None
    return f"SOP {sop}" if sop else ""


def _sop_from_file(path: Path) -> str | None:
    """SOPInstanceUID from the file itself, so a refusal (e.g. 409) can name the instance."""
    # Only a refusal needs pydicom (with numpy): importing it up front costs every run about 0.25 s of CPU.
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    # A malformed file may raise almost anything, and the UID is only a courtesy.
    except Exception:  # noqa: BLE001
        return None
    uid = ds.get("SOPInstanceUID")
    return str(uid) if uid else None


def upload_each(files: list[T], *, parallel: int, upload: Callable[[T], R | None]) -> Iterator[tuple[T, R]]:
    """Run `upload` on each file (or batch of files), `parallel` at a time, started in the order given; yield each
    as it ends.

    `upload` returns None for a file it decided not to try after all (the agent is stopping,
    the portal went down meanwhile).
    """
    # The executor's queue is first in, first out: the oldest files start first.
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="upload") as pool:
        futures = {pool.submit(upload, path): path for path in files}
        for future in as_completed(futures):
            outcome = future.result()
            if outcome is not None:
                yield futures[future], outcome


def send_paths(
    client: httpx.Client,
    paths: Iterable[Path],
    parallel: int,
    *,
    attempts: int = RETRY_ATTEMPTS,
    priority: str | None = None,
) -> list[Outcome]:
    """Upload everything under `paths`, in batches `parallel` at a time; outcomes come back in input order.

    A file that gets no answer or a 5xx waits on its own backoff and is tried again, up to
    `attempts` times in all, while the other files go on.
    """
    # agent.batches builds on this module's single upload.
    from agent.batches import batch_size, batches, upload_batch

    files = discover_files(paths)
    # Filled once the portal refuses the center; later files are then not tried.
    refused: list[Outcome] = []
    tries: dict[Path, int] = {}
    next_try: dict[Path, float] = {}
    outcomes: dict[Path, Outcome] = {}

    def task(group: list[Path]) -> list[Outcome]:
        for path in group:
            tries[path] = tries.get(path, 0) + 1
        return upload_batch(client, group, refused[0] if refused else None, priority=priority)

    show = sys.stderr.isatty()
    bar = tqdm(total=len(files), unit="file", file=sys.stderr, disable=not show)
    # Routing every log line through tqdm only matters when a bar is drawn.
    with bar, logging_redirect_tqdm() if show else contextlib.nullcontext():
        while len(outcomes) < len(files):
            now = time.monotonic()
            due = [path for path in files if path not in outcomes and next_try.get(path, 0.0) <= now]
            if not due:
                time.sleep(min(next_try[p] for p in files if p not in outcomes) - now)
                continue
            groups = batches(due, max_files=batch_size(len(due), parallel))
            for group, group_outcomes in upload_each(groups, parallel=parallel, upload=task):
                for path, outcome in zip(group, group_outcomes, strict=True):
                    if outcome.may_pass_later and tries[path] < attempts:
                        delay = backoff_delay(tries[path] - 1)
                        next_try[path] = time.monotonic() + delay
                        log.warning(
                            "%s: %s; retry %d/%d in %.1f s, the other files go on",
                            path,
                            outcome.detail,
                            tries[path],
                            attempts - 1,
                            delay,
                        )
                        continue
                    if outcome.status_code in _REFUSES_CENTER:
                        refused.append(outcome)
                    _log_outcome(outcome)
                    outcomes[path] = outcome
                    bar.update()
    return [outcomes[path] for path in files]


def _log_outcome(outcome: Outcome) -> None:
    text = f"{outcome.path}: {outcome.result.value}" + (f": {outcome.detail}" if outcome.detail else "")
    level = {Result.SKIPPED: logging.WARNING, Result.FAILED: logging.ERROR}.get(outcome.result, logging.INFO)
    log.log(level, "%s", text)


def summarize(outcomes: list[Outcome]) -> str:
    """The closing report: "N sent, M already present, K skipped, F failed", then each failure."""
    counts = ", ".join(f"{sum(o.result is result for o in outcomes)} {result.value}" for result in Result)
    failures = [f"failed: {o.path}: {o.detail}" for o in outcomes if o.result is Result.FAILED]
    return "\n".join([counts, *failures])
