"""Command line: ``exchange-agent`` / ``python -m agent``."""

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.client import make_client
from agent.config import ConfigError, Settings, load_settings
from agent.receive import DOWNLOAD_WORKERS, receive_forever, receive_once
from agent.send import Result, send_paths, summarize

PROG = "exchange-agent"
log = logging.getLogger(PROG)


def _common_options() -> argparse.ArgumentParser:
    # Shared by the main parser and every subcommand so the options work before or after
    # the subcommand; SUPPRESS keeps an absent option from overwriting one given earlier.
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("Connection Options")
    group.add_argument(
        "--server",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="portal address, e.g. https://exchange.example.org (env EXCHANGE_SERVER)",
    )
    group.add_argument(
        "--key",
        metavar="KEY",
        default=argparse.SUPPRESS,
        help="this center's agent key (env EXCHANGE_KEY; prefer it or the config "
        "file, a command-line key is visible to other local users)",
    )
    group.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        default=argparse.SUPPRESS,
        help="TOML settings file, see agent.example.toml",
    )
    group.add_argument(
        "--ca-bundle",
        metavar="FILE",
        dest="ca_bundle",
        default=argparse.SUPPRESS,
        help="PEM file of the CA that signed the portal's certificate, for a "
        "private CA (env EXCHANGE_CA_BUNDLE); certificates are always verified",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="verbose mode, log every HTTP request and debug details",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description=(
            "The DICOM Exchange site agent sends this center's DICOM Part-10 files to the "
            "exchange portal and receives the files routed to this center into a folder. "
            "Settings come from command-line options, then EXCHANGE_* environment "
            "variables, then the --config file."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    send = commands.add_parser(
        "send",
        parents=[common],
        help="upload DICOM files and folders",
        description=(
            "Upload DICOM files to the portal. Folders are searched recursively in sorted "
            "order, skipping hidden entries; files without the DICOM Part-10 signature are "
            "skipped. Exits 1 if any file failed."
        ),
    )
    send.add_argument("paths", metavar="PATH", nargs="+", type=Path, help="DICOM file or folder to send")
    send.add_argument("--parallel", metavar="N", type=int, help="uploads at a time (config [send] parallel; default 4)")
    send.set_defaults(run=_run_send)

    receive = commands.add_parser(
        "receive",
        parents=[common],
        help="receive this center's deliveries into a folder",
        description=(
            "Lease deliveries from the portal, write each to INBOX/<patient id>/<study uid>/"
            "<series uid>/<sop uid>.dcm atomically, verify its SHA-256 and acknowledge it. "
            "Runs until SIGINT/SIGTERM, or with --once until the queue is empty."
        ),
    )
    receive.add_argument(
        "--inbox", metavar="DIR", type=Path, help="existing folder for received files (config [receive] inbox)"
    )
    receive.add_argument("--once", action="store_true", help="drain the queue, then exit (1 if any delivery failed)")
    receive.add_argument(
        "--limit", metavar="N", type=int, help="deliveries per lease, 1-100 (config [receive] limit; default 10)"
    )
    receive.add_argument(
        "--wait", metavar="S", type=int, help="long-poll seconds when idle, 0-60 (config [receive] wait; default 30)"
    )
    receive.set_defaults(run=_run_receive)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``exchange-agent`` and ``python -m agent``; returns the exit status."""
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    flags = {
        name: getattr(args, name, None)
        for name in ("server", "key", "config", "ca_bundle", "parallel", "inbox", "wait", "limit")
    }
    try:
        settings = load_settings(flags, os.environ)
        return args.run(settings, args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run_send(settings: Settings, args: argparse.Namespace) -> int:
    with make_client(settings, connections=settings.parallel) as client:
        outcomes = send_paths(client, args.paths, settings.parallel)
    print(summarize(outcomes))
    return 1 if any(o.result is Result.FAILED for o in outcomes) else 0


def _run_receive(settings: Settings, args: argparse.Namespace) -> int:
    inbox = settings.inbox
    if inbox is None:
        raise ConfigError('no inbox: give --inbox DIR or put inbox = "..." under [receive] in the config file')
    if not inbox.is_dir():
        # Not created on the fly: a missing folder is often an unmounted share, and
        # images written underneath the mount point would be hidden from everyone.
        raise ConfigError(f"inbox {inbox} does not exist or is not a folder; create it first")
    with make_client(settings, connections=DOWNLOAD_WORKERS + 1) as client:
        if args.once:
            status, summary = receive_once(client, inbox, settings.limit)
            print(summary)
            return status
        log.info("receiving into %s from %s", inbox, settings.server)
        receive_forever(client, inbox, settings.limit, settings.wait)
    return 0


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    # httpx logs every request at INFO; that much detail is for --verbose only.
    logging.getLogger("httpx").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
