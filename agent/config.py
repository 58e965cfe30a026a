"""Settings, taken from the command line first, then the environment, then the TOML file."""

import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

ENVIRONMENT = {"server": "EXCHANGE_SERVER", "key": "EXCHANGE_KEY", "ca_bundle": "EXCHANGE_CA_BUNDLE"}
# TOML layout: section -> {file key: setting name}.
_TOML_KEYS: dict[str | None, dict[str, str]] = {
    None: {"server": "server", "key": "key", "ca_bundle": "ca_bundle", "state_dir": "state_dir"},
    # [send] parallel is the older spelling of [upload] parallel.
    "send": {"parallel": "parallel"},
    "upload": {"parallel": "parallel", "max_attempts": "max_attempts", "give_up_after": "give_up_after"},
    "receive": {"inbox": "inbox", "wait": "wait", "limit": "limit"},
    "scp": {
        "ae_title": "ae_title",
        "port": "port",
        "bind": "bind",
        "spool": "spool",
        "allowed_ae_titles": "allowed_ae_titles",
        "allowed_addresses": "allowed_addresses",
        "stat_calling_aets": "stat_calling_aets",
    },
    "watch": {"outbox": "outbox", "interval": "interval", "settle": "settle", "stat_folders": "stat_folders"},
    "forward": {"to": "forward", "keep_inbox": "keep_inbox", "ae_title": "calling_ae_title"},
    "run": {"roles": "roles", "heartbeat": "heartbeat"},
}
# name: (default, lowest, highest); the bounds are the portal's (limit, wait) or a sane load.
_NUMBERS = {
    "parallel": (4, 1, 32),
    "wait": (30, 0, 60),
    "limit": (50, 1, 100),
    "port": (11112, 1, 65535),
    "interval": (5, 1, 3600),
    "settle": (5, 0, 3600),
    "heartbeat": (60, 5, 3600),
    "max_attempts": (10, 1, 1000),
}
# Seconds, written as a number or with a unit ("90s", "30m", "24h", "2d"): (default, lowest, highest).
_DURATIONS = {"give_up_after": (24 * 3600, 0, 30 * 24 * 3600)}
_DURATION = re.compile(r"\s*(\d+)\s*([smhd]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_STRINGS = ("server", "key", "ca_bundle", "state_dir", "inbox", "spool", "outbox", "bind", "forward")
_PATHS = ("ca_bundle", "state_dir", "inbox", "spool", "outbox")
_STRING_LISTS = ("allowed_ae_titles", "allowed_addresses", "roles", "stat_calling_aets", "stat_folders")
ROLES = ("scp", "watch", "receive", "forward")
# What the portal takes in POST /api/v1/instances?priority=: stat deliveries are leased first.
PRIORITIES = ("routine", "stat")
DEFAULT_AE_TITLE = "EXCHANGE"
APP_NAME = "exchange-agent"
SYSTEM_STATE_DIR = Path("/var/lib") / APP_NAME


class ConfigError(Exception):
    """The settings are missing or wrong; the message tells the user what to fix."""


@dataclass(frozen=True)
class Settings:
    server: str
    key: str = field(repr=False)  # keeps the center key out of logs and tracebacks
    ca_bundle: Path | None = None
    parallel: int = _NUMBERS["parallel"][0]
    inbox: Path | None = None
    wait: int = _NUMBERS["wait"][0]
    limit: int = _NUMBERS["limit"][0]
    # Where the agent keeps its own files: the spool and state.json (last successful syncs).
    state_dir: Path | None = None
    ae_title: str = DEFAULT_AE_TITLE
    port: int = _NUMBERS["port"][0]
    # Empty: every interface, since modalities reach the agent over the LAN.
    bind: str = ""
    spool_dir: Path | None = None
    allowed_ae_titles: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ()
    outbox: Path | None = None
    interval: int = _NUMBERS["interval"][0]
    settle: int = _NUMBERS["settle"][0]
    forward: str | None = None
    keep_inbox: bool = True
    calling_ae_title: str = DEFAULT_AE_TITLE
    roles: tuple[str, ...] = ()
    heartbeat: int = _NUMBERS["heartbeat"][0]
    # When a file that keeps failing (5xx, broken connections) is set aside: both bounds must be reached.
    max_attempts: int = _NUMBERS["max_attempts"][0]
    give_up_after: int = _DURATIONS["give_up_after"][0]
    # `send --priority`; the scp and watch roles take theirs per sender and per folder below.
    priority: str = "routine"
    # Instances from these calling AE titles (an emergency CT, say) are uploaded as stat.
    stat_calling_aets: tuple[str, ...] = ()
    # Folders inside the outbox, relative to it, whose files are uploaded as stat.
    stat_folders: tuple[Path, ...] = ()

    @property
    def spool(self) -> Path | None:
        """The SCP's spool: its own setting, else `spool` inside the state folder."""
        if self.spool_dir is not None:
            return self.spool_dir
        return self.state_dir / "spool" if self.state_dir is not None else None


def load_settings(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """Merge command-line `flags` (None = not given; "config" names the TOML file) with `environ` and the file."""
    config = flags.get("config")
    from_file = read_config(Path(config)) if config else {}

    def pick(name: str) -> Any:
        if flags.get(name) is not None:
            return flags[name]
        env_name = ENVIRONMENT.get(name)
        if env_name and environ.get(env_name):  # an empty variable counts as unset
            return environ[env_name]
        return from_file.get(name)

    server = pick("server")
    key = pick("key")
    if not server:
        raise ConfigError(
            'no portal address: give --server, set EXCHANGE_SERVER or put server = "..." in the config file'
        )
    if not key:
        raise ConfigError('no center key: give --key, set EXCHANGE_KEY or put key = "..." in the config file')
    ca_bundle = pick("ca_bundle")

    def path(name: str) -> Path | None:
        value = pick(name)
        return Path(value) if value else None

    keep_inbox = pick("keep_inbox")
    if keep_inbox is not None and not isinstance(keep_inbox, bool):
        raise ConfigError(f"keep_inbox must be true or false, not {keep_inbox!r}")
    roles = tuple(pick("roles") or ())
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        raise ConfigError(f"unknown role {unknown[0]!r} in roles; choose from {', '.join(ROLES)}")
    forward = pick("forward")
    if forward:
        parse_peer(forward)
    priority = pick("priority") or "routine"
    if priority not in PRIORITIES:
        raise ConfigError(f"priority is one of {', '.join(PRIORITIES)}, not {priority!r}")
    return Settings(
        server=_check_server(server),
        key=key,
        ca_bundle=_check_ca_bundle(Path(ca_bundle)) if ca_bundle else None,
        inbox=path("inbox"),
        state_dir=path("state_dir") or default_state_dir(environ),
        ae_title=_check_ae_title("ae_title", pick("ae_title") or DEFAULT_AE_TITLE),
        bind=pick("bind") or "",
        spool_dir=path("spool"),
        allowed_ae_titles=tuple(_check_ae_title("allowed_ae_titles", t) for t in pick("allowed_ae_titles") or ()),
        allowed_addresses=tuple(pick("allowed_addresses") or ()),
        outbox=path("outbox"),
        forward=forward or None,
        keep_inbox=True if keep_inbox is None else keep_inbox,
        calling_ae_title=_check_ae_title("ae_title", pick("calling_ae_title") or DEFAULT_AE_TITLE),
        roles=roles,
        priority=priority,
        stat_calling_aets=tuple(_check_ae_title("stat_calling_aets", t) for t in pick("stat_calling_aets") or ()),
        stat_folders=tuple(_check_stat_folder(f) for f in pick("stat_folders") or ()),
        **{name: _check_number(name, pick(name)) for name in _NUMBERS},
        **{name: _check_duration(name, pick(name)) for name in _DURATIONS},
    )


def default_state_dir(environ: Mapping[str, str], euid: int | None = None) -> Path:
    """The agent's own folder when none is configured.

    Under systemd with StateDirectory= (as in the shipped unit) the folder systemd made;
    as root, or under systemd when it exists, /var/lib/exchange-agent; otherwise the
    user's XDG state folder, $XDG_STATE_HOME/exchange-agent or ~/.local/state/exchange-agent.
    """
    if environ.get("STATE_DIRECTORY"):
        # systemd lists one folder per StateDirectory= entry, separated by colons.
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    if euid is None:
        euid = os.geteuid() if hasattr(os, "geteuid") else -1
    # INVOCATION_ID alone is not enough: desktop terminals run as systemd user services too.
    if euid == 0 or (environ.get("INVOCATION_ID") and SYSTEM_STATE_DIR.is_dir()):
        return SYSTEM_STATE_DIR
    if os.name == "nt" and environ.get("LOCALAPPDATA"):
        return Path(environ["LOCALAPPDATA"]) / APP_NAME
    xdg = environ.get("XDG_STATE_HOME", "")
    # The XDG spec: a relative value is invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / APP_NAME
    home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    return home / ".local" / "state" / APP_NAME


def parse_peer(text: str) -> tuple[str, str, int]:
    """Split a DICOM peer written AET@host:port into its parts."""
    aet, at, address = text.rpartition("@")
    host, colon, port = address.rpartition(":")
    if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"a DICOM peer is written AET@host:port, e.g. PACS@192.168.1.10:104, not {text!r}")
    return _check_ae_title("forward", aet), host.strip("[]"), int(port)


def read_config(path: Path) -> dict[str, Any]:
    """Read the TOML file into flat setting names; relative paths in it are relative to the file."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    settings: dict[str, Any] = {}
    for section, keys in _TOML_KEYS.items():
        table = data if section is None else data.get(section, {})
        where = "top level" if section is None else f"[{section}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a table, e.g. [{section}]")
        for name, value in table.items():
            if section is None and name in _TOML_KEYS:
                continue
            if name not in keys:
                raise ConfigError(f"{path}: unknown key {name!r} at {where}")
            settings[keys[name]] = value
    for name in _STRINGS:
        if name in settings and not isinstance(settings[name], str):
            raise ConfigError(f"{path}: {name} must be a string")
    for name in _STRING_LISTS:
        value = settings.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(f'{path}: {name} must be a list of strings, e.g. ["a", "b"]')
    for name in _PATHS:
        if settings.get(name):
            settings[name] = str(path.parent / Path(settings[name]).expanduser())
    if "key" in settings and os.name == "posix" and path.stat().st_mode & 0o044:
        log.warning("%s holds the center key and other users can read it; run: chmod 600 %s", path, path)
    return settings


def _check_server(server: str) -> str:
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"server must be an http(s) URL like https://exchange.example.org, not {server!r}")
    if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        log.warning("server %s is plain HTTP: the center key and patient data travel unencrypted", server)
    return server.rstrip("/")


def _check_ca_bundle(path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(f"CA bundle {path} does not exist or is not a file")
    return path


def _check_ae_title(name: str, value: Any) -> str:
    # DICOM AE titles: up to 16 characters of the default repertoire, no backslash or controls.
    text = value.strip() if isinstance(value, str) else ""
    if not text or len(text) > 16 or not text.isascii() or not text.isprintable() or "\\" in text:
        raise ConfigError(f"{name}: an AE title is 1-16 printable ASCII characters without '\\', not {value!r}")
    return text


def _check_stat_folder(value: Any) -> Path:
    # Inside the outbox, so the outbox's sent/ and failed/ keep the same layout.
    folder = Path(value) if isinstance(value, str) else None
    if (
        folder is None
        or not value.strip()
        or folder.is_absolute()
        or ".." in folder.parts
        or folder == Path(".")
        # The outbox's own sent/ and failed/ are never uploaded from.
        or folder.parts[0] in ("sent", "failed")
    ):
        raise ConfigError(
            f'stat_folders: a folder inside the outbox, written relative to it (e.g. "stat" or "er/ct"), not {value!r}'
        )
    return folder


def _check_duration(name: str, value: Any) -> int:
    default, lowest, highest = _DURATIONS[name]
    if value is None:
        return default
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if type(value) is int:
        seconds = value
    elif match:
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
    else:
        seconds = -1
    if not lowest <= seconds <= highest:
        raise ConfigError(
            f'{name} is seconds, as a number or with a unit like "90s", "30m", "24h" or "2d", '
            f"at most 30 days, not {value!r}"
        )
    return seconds


def _check_number(name: str, value: Any) -> int:
    default, lowest, highest = _NUMBERS[name]
    if value is None:
        return default
    # bool is an int in Python, and TOML `true` must not pass for 1.
    if type(value) is not int or not lowest <= value <= highest:
        raise ConfigError(f"{name} must be a whole number from {lowest} to {highest}, not {value!r}")
    return value
