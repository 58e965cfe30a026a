"""Settings, taken from the command line first, then the environment, then the TOML file."""

import logging
import os
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
    None: {"server": "server", "key": "key", "ca_bundle": "ca_bundle"},
    "send": {"parallel": "parallel"},
    "receive": {"inbox": "inbox", "wait": "wait", "limit": "limit"},
}
# name: (default, lowest, highest); the bounds are the portal's (limit, wait) or a sane load.
_NUMBERS = {"parallel": (4, 1, 32), "wait": (30, 0, 60), "limit": (10, 1, 100)}


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
    inbox = pick("inbox")
    return Settings(
        server=_check_server(server),
        key=key,
        ca_bundle=_check_ca_bundle(Path(ca_bundle)) if ca_bundle else None,
        inbox=Path(inbox) if inbox else None,
        **{name: _check_number(name, pick(name)) for name in _NUMBERS},
    )


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
    for name in ("ca_bundle", "inbox"):
        if isinstance(settings.get(name), str):
            settings[name] = str(path.parent / Path(settings[name]).expanduser())
    for name in ("server", "key", "ca_bundle", "inbox"):
        if name in settings and not isinstance(settings[name], str):
            raise ConfigError(f"{path}: {name} must be a string")
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


def _check_number(name: str, value: Any) -> int:
    default, lowest, highest = _NUMBERS[name]
    if value is None:
        return default
    # bool is an int in Python, and TOML `true` must not pass for 1.
    if type(value) is not int or not lowest <= value <= highest:
        raise ConfigError(f"{name} must be a whole number from {lowest} to {highest}, not {value!r}")
    return value
