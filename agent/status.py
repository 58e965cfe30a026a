"""`status`: what is waiting where, when the agent last synced, and whether the portal takes the key."""

from collections.abc import Iterator
from pathlib import Path

import httpx

from agent.client import RateLimited, RetryableStatus, check_retryable, describe, error_reason
from agent.config import Settings
from agent.heartbeat import PATH
from agent.retry import ledger_path, read_ledger
from agent.spool import Spool, last_set_aside
from agent.state import read_state
from agent.watch import Outbox

SYNC_EVENTS = ("upload", "receive", "heartbeat")


def portal_check(client: httpx.Client) -> tuple[bool, str]:
    """Ask the portal who this key belongs to, without changing anything there."""
    try:
        response = check_retryable(client.get(PATH, timeout=15))
    except RateLimited as exc:
        return False, f"reachable, but it asks this key to slow down (HTTP 429, retry in {exc.retry_after:.0f} s)"
    except (httpx.HTTPError, RetryableStatus) as exc:
        return False, f"unreachable: {describe(exc)}"
    if response.status_code != 200:
        return False, f"reachable, but the key was refused: {error_reason(response)}"
    try:
        center = response.json().get("center", {}).get("name", "?")
    except (ValueError, AttributeError):
        center = "?"
    return True, f"reachable, key accepted for {center}"


def status_lines(settings: Settings, portal: tuple[bool, str]) -> Iterator[str]:
    yield f"portal: {settings.server} {portal[1]}"
    spool_dir = settings.spool
    failed_folders = []
    if spool_dir is not None and spool_dir.is_dir():
        spool = Spool(spool_dir)
        stats = spool.stats()
        failed_folders.append(spool.failed)
        yield (
            f"spool: {stats.count} waiting ({human_bytes(stats.bytes)}), {_retrying(settings, 'spool', spool_dir)}"
            f" retrying, {stats.failed} set aside in failed/  [{spool_dir}]"
        )
    if settings.outbox is not None and settings.outbox.is_dir():
        outbox = Outbox(settings.outbox, settings.settle)
        counts = outbox.counts()
        failed_folders.append(outbox.failed)
        yield (
            f"outbox: {counts['pending']} waiting, {_retrying(settings, 'outbox', settings.outbox)} retrying,"
            f" {counts['failed']} set aside in failed/  [{settings.outbox}]"
        )
    latest = last_set_aside(failed_folders)
    if latest is not None:
        yield f"last set aside: {latest.isoformat(timespec='seconds')}"
    if settings.inbox is not None and settings.inbox.is_dir():
        yield f"inbox: {_count_files(settings.inbox)} files  [{settings.inbox}]"
    state = read_state(settings.state_dir) if settings.state_dir is not None else {}
    for event in SYNC_EVENTS:
        yield f"last {event}: {state.get(event, 'never')}"


def _retrying(settings: Settings, kind: str, folder: Path) -> int:
    """Files that failed and wait for their next attempt, as the running agent last recorded them."""
    if settings.state_dir is None:
        return 0
    return len(read_ledger(ledger_path(settings.state_dir, kind, folder)))


def _count_files(folder: Path) -> int:
    # Hidden names are partial downloads and whole studies still being staged.
    return sum(
        1 for p in folder.rglob("*.dcm") if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"
