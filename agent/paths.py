"""Turn DICOM values chosen by other centers into file-system names that stay in the inbox."""

import os
import unicodedata
from collections.abc import Mapping
from pathlib import Path

MAX_COMPONENT_CHARS = 64
# 64 characters can reach 256 bytes in UTF-8; most file systems stop at 255, and the
# ".dcm" suffix and temporary-file affixes need room too.
MAX_COMPONENT_BYTES = 200
# Characters that separate paths anywhere, or that Windows refuses in names.
_FORBIDDEN = set('/\\<>:"|?*') | {os.sep}
# Control and format characters (bidi overrides can disguise a name), lone surrogates
# (not encodable on disk) and Unicode line breaks.
_FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
# Windows opens a device instead of a file for these names, whatever the extension.
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}


class UnsafePathError(ValueError):
    """A delivery would land outside the inbox."""


def safe_component(value: str | None, fallback: str = "UNKNOWN") -> str:
    """Return `value` as one harmless path component, or `fallback` when nothing usable is left."""
    text = "".join("_" if _is_forbidden(ch) else ch for ch in (value or "").strip())
    text = text[:MAX_COMPONENT_CHARS]
    while len(text.encode("utf-8")) > MAX_COMPONENT_BYTES:
        text = text[:-1]
    # Leading dots hide the entry or, as "." and "..", walk the tree; Windows silently
    # drops trailing dots and spaces, which would merge distinct names.
    stripped = text.lstrip(".")
    text = "_" * (len(text) - len(stripped)) + stripped
    stripped = text.rstrip(". ")
    text = stripped + "_" * (len(text) - len(stripped))
    if text.split(".")[0].upper() in _WINDOWS_DEVICES:
        text = "_" + text
    return text or fallback


def _is_forbidden(ch: str) -> bool:
    return ch in _FORBIDDEN or unicodedata.category(ch) in _FORBIDDEN_CATEGORIES


def _part(delivery: Mapping[str, object], key: str, fallback: str = "UNKNOWN") -> str:
    value = delivery.get(key)
    return safe_component(value if isinstance(value, str) else None, fallback)


def study_folder(delivery: Mapping[str, object]) -> tuple[str, str]:
    """The (<patient>, <study>) folders of a delivery under the inbox."""
    return _part(delivery, "patient_id"), _part(delivery, "study_instance_uid")


def delivery_path(inbox: Path, delivery: Mapping[str, object]) -> Path:
    """Return inbox/<patient>/<study>/<series>/<sop>.dcm for a delivery from the portal."""

    def part(key: str, fallback: str = "UNKNOWN") -> str:
        return _part(delivery, key, fallback)

    sop_fallback = safe_component(f"delivery-{delivery.get('id')}")
    path = inbox.joinpath(
        *study_folder(delivery),
        part("series_instance_uid"),
        part("sop_instance_uid", sop_fallback) + ".dcm",
    )
    # The names are safe, but a symlinked folder inside the inbox could still point elsewhere.
    if not path.resolve().is_relative_to(inbox.resolve()):
        raise UnsafePathError(f"{path} resolves outside the inbox {inbox}")
    return path
