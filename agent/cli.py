"""Command line: ``exchange-agent`` / ``python -m agent``."""

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.client import make_client
from agent.config import PRIORITIES, ROLES, ConfigError, Settings, load_settings
from agent.send import Result, send_paths, summarize

PROG = "exchange-agent"
_FLAGS = (
    "server",
    "key",
    "config",
    "ca_bundle",
    "state_dir",
    "parallel",
    "inbox",
    "wait",
    "limit",
    "forward",
    "keep_inbox",
    "ae_title",
    "port",
    "bind",
    "spool",
    "allowed_ae_titles",
    "allowed_addresses",
    "outbox",
    "interval",
    "settle",
    "max_attempts",
    "give_up_after",
    "priority",
    "stat_calling_aets",
    "stat_folders",
)
log = logging.getLogger(PROG)
PARALLEL_HELP = "uploads at a time (config [upload] parallel; default 4)"


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
        "--state-dir",
        metavar="DIR",
        dest="state_dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="the agent's own folder: spool, retry counts and last-sync state (config state_dir; default "
        "~/.local/state/exchange-agent, or /var/lib/exchange-agent as root or a systemd service)",
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
    send.add_argument(
        "--parallel", metavar="N", type=int, help="uploads at a time (config [upload] parallel; default 4)"
    )
    send.add_argument(
        "--priority",
        choices=PRIORITIES,
        help="stat: the receiving centers get these files before every routine one (default routine)",
    )
    send.set_defaults(run=_run_send)

    receive = commands.add_parser(
        "receive",
        parents=[common],
        help="receive this center's deliveries into a folder",
        description=(
            "Lease deliveries from the portal, write each to INBOX/<patient id>/<study uid>/"
            "<series uid>/<sop uid>.dcm atomically, verify its SHA-256 and acknowledge it; the files "
            "of a whole study (deliver: study) wait in INBOX/.staging until all of them are in. "
            "Runs until SIGINT/SIGTERM, or with --once until the queue is empty."
        ),
    )
    receive.add_argument(
        "--inbox", metavar="DIR", type=Path, help="existing folder for received files (config [receive] inbox)"
    )
    receive.add_argument("--once", action="store_true", help="drain the queue, then exit (1 if any delivery failed)")
    receive.add_argument(
        "--limit", metavar="N", type=int, help="deliveries per lease, 1-100 (config [receive] limit; default 50)"
    )
    receive.add_argument(
        "--wait", metavar="S", type=int, help="long-poll seconds when idle, 0-60 (config [receive] wait; default 30)"
    )
    receive.add_argument(
        "--forward",
        metavar="AET@HOST:PORT",
        help="also send every delivery to the local PACS by C-STORE; acknowledged only once it accepted it "
        "(config [forward] to)",
    )
    keep = receive.add_mutually_exclusive_group()
    keep.add_argument(
        "--keep-inbox",
        dest="keep_inbox",
        action="store_true",
        default=None,
        help="with --forward, keep the inbox copy (the default; config [forward] keep_inbox)",
    )
    keep.add_argument(
        "--no-keep-inbox",
        dest="keep_inbox",
        action="store_false",
        help="with --forward, remove the inbox copy once the PACS has it",
    )
    receive.set_defaults(run=_run_receive)

    scp = commands.add_parser(
        "scp",
        parents=[common],
        help="DICOM listener (C-STORE, C-ECHO) that spools and uploads what modalities send",
        description=(
            "Accept C-STORE from modalities and the local PACS, write each instance durably to the spool "
            "before answering success, and upload the spool to the portal several files at a time, oldest "
            "first. A file that keeps failing waits on its own backoff while the others go on, and is set aside "
            "in SPOOL/failed/ with a .reason file once it reached the upload bounds. Runs until SIGINT/SIGTERM."
        ),
    )
    scp.add_argument("--ae-title", dest="ae_title", metavar="AET", help="this listener's AE title (default EXCHANGE)")
    scp.add_argument("--port", type=int, metavar="PORT", help="TCP port (default 11112)")
    scp.add_argument("--bind", metavar="ADDRESS", help="listen on this address only (default: every interface)")
    scp.add_argument("--spool", type=Path, metavar="DIR", help="spool folder (default STATE_DIR/spool)")
    scp.add_argument(
        "--allow-ae",
        dest="allowed_ae_titles",
        metavar="AET",
        action="append",
        help="accept only this calling AE title (repeatable; config [scp] allowed_ae_titles)",
    )
    scp.add_argument(
        "--allow-address",
        dest="allowed_addresses",
        metavar="ADDRESS",
        action="append",
        help="accept connections only from this address or network, e.g. 10.1.2.0/24 (repeatable)",
    )
    scp.add_argument(
        "--stat-ae",
        dest="stat_calling_aets",
        metavar="AET",
        action="append",
        help="upload what this calling AE title sends as stat, e.g. the emergency CT (repeatable; "
        "config [scp] stat_calling_aets)",
    )
    _upload_options(scp)
    scp.set_defaults(run=_run_roles, roles=["scp"])

    watch = commands.add_parser(
        "watch",
        parents=[common],
        help="upload files dropped into a folder",
        description=(
            "Upload every file dropped into OUTBOX (sub-folders too) once it has stopped changing, then move it "
            "to OUTBOX/sent/, or on a permanent refusal, or once it kept failing up to the upload bounds, to "
            "OUTBOX/failed/ with a .reason file. Runs until SIGINT/SIGTERM."
        ),
    )
    watch.add_argument("--outbox", type=Path, metavar="DIR", help="the folder to watch (config [watch] outbox)")
    watch.add_argument("--interval", type=int, metavar="S", help="seconds between scans (default 5)")
    watch.add_argument("--settle", type=int, metavar="S", help="seconds a file must be unchanged (default 5)")
    watch.add_argument(
        "--stat-folder",
        dest="stat_folders",
        metavar="DIR",
        action="append",
        help="upload the files of this folder inside the outbox (relative to it) as stat, first "
        "(repeatable; config [watch] stat_folders)",
    )
    _upload_options(watch)
    watch.set_defaults(run=_run_roles, roles=["watch"])

    run = commands.add_parser(
        "run",
        parents=[common],
        help="run the configured roles (scp, watch, receive, forward) as one service",
        description="Run the roles listed under [run] roles in the config file in one process until SIGTERM.",
    )
    run.add_argument(
        "--role", dest="roles", action="append", choices=ROLES, help="run this role (repeatable; beats [run] roles)"
    )
    _upload_options(run)
    run.set_defaults(run=_run_roles, roles=None)

    status = commands.add_parser(
        "status",
        parents=[common],
        help="spool, outbox and inbox counts, the last syncs, and whether the portal takes the key",
    )
    status.set_defaults(run=_run_status)
    return parser


def _upload_options(command: argparse.ArgumentParser) -> None:
    group = command.add_argument_group("Upload Options")
    group.add_argument(
        "--parallel", metavar="N", type=int, help="uploads at a time (config [upload] parallel; default 4)"
    )
    group.add_argument(
        "--max-attempts",
        dest="max_attempts",
        metavar="N",
        type=int,
        help="a file that keeps failing (5xx, broken connection) is set aside in failed/ after N failed attempts "
        "and --give-up-after (config [upload] max_attempts; default 10)",
    )
    group.add_argument(
        "--give-up-after",
        dest="give_up_after",
        metavar="TIME",
        help='...and no sooner than TIME after its first failure: seconds, or "30m", "24h", "2d" '
        "(config [upload] give_up_after; default 24h)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``exchange-agent`` and ``python -m agent``; returns the exit status."""
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    flags = {name: getattr(args, name, None) for name in (*_FLAGS, "roles")}
    try:
        settings = load_settings(flags, os.environ)
        return args.run(settings, args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the DICOM port is taken, a folder is not writable
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run_send(settings: Settings, args: argparse.Namespace) -> int:
    with make_client(settings, connections=settings.parallel) as client:
        outcomes = send_paths(client, args.paths, settings.parallel, priority=settings.priority)
    print(summarize(outcomes))
    return 1 if any(o.result is Result.FAILED for o in outcomes) else 0


def _run_receive(settings: Settings, args: argparse.Namespace) -> int:
    # Imported by the commands that use them: pynetdicom, numpy and pydicom's pixel
    # handlers come with them, about 0.35 s of CPU that `send` has no use for.
    from agent.forward import Forwarder
    from agent.receive import DOWNLOAD_WORKERS, Target, prepare_inbox, receive_once
    from agent.service import check_roles, run_service
    from agent.state import State

    roles = ["receive", "forward"] if settings.forward else ["receive"]
    if not args.once:
        return run_service(settings, roles)
    check_roles(settings, roles)
    forwarder = Forwarder(settings.forward, calling_ae_title=settings.calling_ae_title) if settings.forward else None
    prepare_inbox(settings.inbox)
    target = Target(settings.inbox, forwarder, settings.keep_inbox, State(settings.state_dir))
    with make_client(settings, connections=DOWNLOAD_WORKERS + 1) as client:
        status, summary = receive_once(client, target, settings.limit)
    print(summary)
    return status


def _run_roles(settings: Settings, args: argparse.Namespace) -> int:
    from agent.service import run_service

    return run_service(settings, args.roles or settings.roles)


def _run_status(settings: Settings, args: argparse.Namespace) -> int:
    from agent.status import portal_check, status_lines

    with make_client(settings, connections=1) as client:
        portal = portal_check(client)
    for line in status_lines(settings, portal):
        print(line)
    return 0 if portal[0] else 1


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    # httpx logs every request at INFO; that much detail is for --verbose only.
    logging.getLogger("httpx").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # pynetdicom logs every PDU at INFO; the agent logs what happened to each instance itself.
    logging.getLogger("pynetdicom").setLevel(logging.INFO if verbose else logging.WARNING)
