"""`python -m portal.serve`: the portal's uvicorn workers, each listening on a socket of its own.

`uvicorn --workers N` binds one socket in its main process and every worker accepts
from it. The worker that wakes first takes every connection waiting (uvloop accepts
until the queue is empty), so a burst of keep-alive connections lands on one or two
workers while the others idle: 49 of wrk's 50 on one of four, measured
(docs/benchmarks.md), and the long poll's p99 follows the busiest worker. Here each
worker binds the same address with SO_REUSEPORT and the kernel spreads new
connections over the workers by a hash of each connection's addresses.

The main process checks the settings and the address, starts the workers, starts again
one that dies, and on SIGTERM or SIGINT passes SIGTERM on and waits for the workers to
finish their requests (uvicorn's graceful shutdown in each).
"""

import argparse
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait

APPLICATION = "portal.asgi:application"
# A worker that dies sooner than this after its start is started again after a pause that
# doubles up to RESTART_PAUSE_MAX (the database still starting, say), not in a tight loop.
STARTUP_SECONDS = 10.0
RESTART_PAUSE_MAX = 30.0

logger = logging.getLogger("portal.serve")


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A socket bound to host:port that other sockets with SO_REUSEPORT may bind too."""
    # IPPROTO_TCP, not 0: asyncio's loop sets TCP_NODELAY only on sockets that say so, and
    # without it every answer waits for the client's delayed ACK (uvloop sets it regardless).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def serve_worker(host: str, port: int, log_level: str, graceful_seconds: int | None) -> None:
    """One worker process: its own socket, then uvicorn as `uvicorn portal.asgi:application` runs it."""
    import uvicorn

    sock = listening_socket(host, port)
    config = uvicorn.Config(
        APPLICATION,
        host=host,
        port=port,
        # No access log: a QIDO or UI search carries a patient's name in its URL.
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_seconds,
    )
    uvicorn.Server(config).run(sockets=[sock])


@dataclass
class Slot:
    process: multiprocessing.Process | None = None
    started: float = 0.0
    pause: float = 0.0
    restart_at: float = 0.0


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.context = multiprocessing.get_context("spawn")
        self.slots = [Slot() for _ in range(args.workers)]
        self.stopping = False

    def run(self) -> int:
        # A bad setting or a port taken by another server stops the portal here, once,
        # instead of in every worker again and again.
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
        from django.conf import settings

        settings.INSTALLED_APPS  # noqa: B018 (reading one setting loads and checks them all)
        listening_socket(self.args.host, self.args.port).close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        logger.info("portal on %s:%d, %d workers", self.args.host, self.args.port, self.args.workers)
        while not self.stopping:
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is not None and not slot.process.is_alive():
                    quick = now - slot.started < STARTUP_SECONDS
                    slot.pause = min(max(slot.pause * 2, 1.0), RESTART_PAUSE_MAX) if quick else 0.0
                    logger.warning(
                        "worker %d exited (%s); another in %.0f s", slot.process.pid, slot.process.exitcode, slot.pause
                    )
                    slot.process, slot.restart_at = None, now + slot.pause
                if slot.process is None and now >= slot.restart_at:
                    slot.process, slot.started = self._start_worker(), now
            wait([slot.process.sentinel for slot in self.slots if slot.process is not None], timeout=0.5)
        running = [slot.process for slot in self.slots if slot.process is not None]
        for process in running:
            process.terminate()  # SIGTERM: uvicorn finishes the requests under way
        for process in running:
            process.join()
        return 0

    def _start_worker(self) -> multiprocessing.Process:
        args = self.args
        process = self.context.Process(
            target=serve_worker,
            args=(args.host, args.port, args.log_level, args.timeout_graceful_shutdown),
            name="portal-worker",
        )
        process.start()
        return process

    def _stop(self, signum, frame) -> None:
        self.stopping = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portal.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument(
        "--timeout-graceful-shutdown", type=int, default=None, help="seconds a stopping worker waits for its requests"
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be 1 or more")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    return Supervisor(args).run()


if __name__ == "__main__":
    sys.exit(main())
