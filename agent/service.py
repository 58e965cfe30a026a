"""`run` (and the long-running `scp`, `watch`, `receive`): the agent's roles in one process until SIGTERM."""

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from types import FrameType
from typing import Any, Protocol

from agent.client import make_client
from agent.config import ConfigError, Settings
from agent.forward import Forwarder
from agent.heartbeat import Heartbeat
from agent.receive import DOWNLOAD_WORKERS, Receiver, Target, prepare_inbox
from agent.retry import Ledger, RetryPolicy, ledger_path
from agent.scp import StoreListener
from agent.spool import Spool, SpoolBusy, last_set_aside
from agent.state import State
from agent.uploads import Drainer
from agent.watch import Outbox

log = logging.getLogger(__name__)

# How long shutdown waits for an upload, download or forward under way to finish.
FINISH_SECONDS = 120


class Worker(Protocol):
    busy: threading.Lock

    def run(self) -> None: ...


def check_roles(settings: Settings, roles: Sequence[str]) -> None:
    """Fail early, with the setting to fix, when a role lacks what it needs."""
    if not roles:
        raise ConfigError('no roles to run: put roles = ["scp", "watch", "receive", "forward"] under [run]')
    if "scp" in roles and settings.spool is None:
        raise ConfigError('the scp role needs a spool: set state_dir = "..." or [scp] spool = "..."')
    if "watch" in roles:
        _existing("outbox", settings.outbox, '[watch] outbox = "..." or --outbox DIR')
    if "receive" in roles or "forward" in roles:
        _existing("inbox", settings.inbox, '[receive] inbox = "..." or --inbox DIR')
    if "forward" in roles and not settings.forward:
        raise ConfigError('the forward role needs the PACS: [forward] to = "AET@host:port" or --forward')


def _existing(name: str, folder, how: str) -> None:
    if folder is None:
        raise ConfigError(f"no {name}: give {how}")
    if not folder.is_dir():
        # Not created on the fly: a missing folder is often an unmounted share, and
        # images written underneath the mount point would be hidden from everyone.
        raise ConfigError(f"{name} {folder} does not exist or is not a folder; create it first")


def run_service(settings: Settings, roles: Sequence[str]) -> int:
    """Run `roles` until SIGINT/SIGTERM; 0 after a clean stop, 1 when a role broke down."""
    check_roles(settings, roles)
    stop = threading.Event()
    failed = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s received; stopping", signal.Signals(signum).name)
        stop.set()

    # SIGINT too: a service manager may start the agent with SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)

    state = State(settings.state_dir)
    workers: dict[str, Worker] = {}
    listener: StoreListener | None = None
    spool = outbox = None
    ledgers: dict[str, Ledger] = {}
    policy = RetryPolicy(settings.max_attempts, settings.give_up_after)
    uploaders = settings.parallel * (("scp" in roles) + ("watch" in roles))
    with make_client(settings, connections=DOWNLOAD_WORKERS + uploaders + 2) as client:

        def drainer(queue: Spool | Outbox) -> Drainer:
            where = ledger_path(settings.state_dir, queue.label, queue.folder) if settings.state_dir else None
            ledgers[queue.label] = Ledger(where)
            return Drainer(
                client,
                queue,
                state,
                stop=stop,
                interval=settings.interval,
                parallel=settings.parallel,
                policy=policy,
                ledger=ledgers[queue.label],
            )

        if "scp" in roles:
            spool = Spool(settings.spool)
            try:
                spool.claim()
            except SpoolBusy as exc:
                raise ConfigError(str(exc)) from exc
            workers["spool"] = spool_drainer = drainer(spool)
            listener = StoreListener(
                spool,
                ae_title=settings.ae_title,
                bind=settings.bind,
                port=settings.port,
                allowed_ae_titles=settings.allowed_ae_titles,
                allowed_addresses=settings.allowed_addresses,
                stat_calling_aets=settings.stat_calling_aets,
                on_stored=spool_drainer.wake.set,
            )
        if "watch" in roles:
            outbox = Outbox(settings.outbox, settings.settle, settings.stat_folders)
            outbox.prepare()
            workers["watch"] = drainer(outbox)
            log.info(
                "watching %s (every %d s, files unchanged for %d s)", outbox.folder, settings.interval, settings.settle
            )
        if "receive" in roles or "forward" in roles:
            forwarder = None
            if "forward" in roles:
                forwarder = Forwarder(settings.forward, calling_ae_title=settings.calling_ae_title)
            prepare_inbox(settings.inbox)
            target = Target(settings.inbox, forwarder, settings.keep_inbox, state)
            workers["receive"] = Receiver(client, target, limit=settings.limit, wait=settings.wait, stop=stop)
            log.info(
                "receiving into %s from %s%s",
                settings.inbox,
                settings.server,
                f", forwarding to {settings.forward}" + ("" if settings.keep_inbox else " (inbox copy removed)")
                if forwarder
                else "",
            )

        def sizes() -> dict[str, Any]:
            found: dict[str, Any] = {}
            if spool is not None:
                found["spool"] = {**asdict(spool.stats()), "retrying": ledgers["spool"].retrying()}
            if outbox is not None:
                found["outbox"] = {**outbox.counts(), "retrying": ledgers["outbox"].retrying()}
            latest = last_set_aside([queue.failed for queue in (spool, outbox) if queue is not None])
            found["last_failure_at"] = latest.isoformat(timespec="seconds") if latest else None
            return found

        running = sorted({*roles, *(["receive"] if "forward" in roles else [])})
        workers["heartbeat"] = Heartbeat(
            client, roles=running, interval=settings.heartbeat, sizes=sizes, state=state, stop=stop
        )
        if listener is not None:
            listener.start()
        threads = [_start(name, worker.run, stop, failed) for name, worker in workers.items()]
        log.info("agent running: %s", ", ".join(running))
        try:
            while not stop.wait(1):
                pass
        finally:
            if listener is not None:
                listener.stop()
            for name, worker in workers.items():
                # Let an upload, download or forward under way finish, within reason.
                if worker.busy.acquire(timeout=FINISH_SECONDS):
                    worker.busy.release()
                else:
                    log.warning("%s: still busy after %d s; leaving it unfinished", name, FINISH_SECONDS)
            for thread in threads:
                thread.join(timeout=1)
    log.info("agent stopped")
    return 1 if failed.is_set() else 0


def _start(name: str, run: Callable[[], None], stop: threading.Event, failed: threading.Event) -> threading.Thread:
    def guarded() -> None:
        try:
            run()
        except Exception:
            # A role that broke down stops the whole agent, so the service manager restarts it.
            log.exception("%s stopped on an unexpected error", name)
            failed.set()
            stop.set()

    # Daemon: an idle long poll must not hold the process once everything else has finished.
    thread = threading.Thread(target=guarded, name=name, daemon=True)
    thread.start()
    return thread
