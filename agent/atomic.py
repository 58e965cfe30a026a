"""Place received files so that a crash never leaves a partial or unverified file under its final name."""

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1024 * 1024
_PART = re.compile(r"\..+\.[0-9a-f]{12}\.part")


class ChecksumMismatch(Exception):
    """The received bytes do not hash to what the portal announced."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"SHA-256 mismatch: expected {expected}, received {actual}")
        self.expected = expected
        self.actual = actual


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_verified(dest: Path, chunks: Iterable[bytes], expected_sha256: str, *, sync_folder: bool = True) -> str:
    """Write `chunks` to `dest` atomically and durably; return their SHA-256.

    The bytes go to a hidden ".part" file in the destination folder (so the final rename
    stays on one file system) and only replace `dest` when their hash equals
    `expected_sha256`; otherwise the temporary file is removed and ChecksumMismatch raised.
    With `sync_folder` False the caller makes the rename durable: `sync_folders` on
    `dest.parent` before it relies on the file, once for many files of one folder.
    """
    return _write(dest, chunks, expected_sha256, sync_folder)


def write_durable(dest: Path, chunks: Iterable[bytes]) -> str:
    """Write `chunks` to `dest` atomically and durably (fsynced file and folder); return their SHA-256."""
    return _write(dest, chunks, None, True)


def sync_folders(folders: Iterable[Path]) -> None:
    """Make the renames into each of `folders` durable (one fsync a folder)."""
    for folder in folders:
        _fsync_dir(folder)


def _write(dest: Path, chunks: Iterable[bytes], expected_sha256: str | None, sync_folder: bool) -> str:
    _make_dirs(dest.parent)
    tmp = dest.parent / f".{dest.stem}.{secrets.token_hex(6)}.part"
    # os.open rather than tempfile so the final file gets the usual umask-based mode,
    # not 0600: a PACS importer running as another user may need to read it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if expected_sha256 is not None and actual != expected_sha256.lower():
            raise ChecksumMismatch(expected_sha256, actual)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_folder:
        _fsync_dir(dest.parent)
    return actual


def remove_partials(folder: Path) -> list[Path]:
    """Delete the ".part" files a killed writer left under `folder`; return them.

    Only names of the form this module writes are touched, so a user's own files stay.
    """
    removed = []
    for path in folder.rglob(".*.part"):
        if _PART.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def make_dirs(folder: Path) -> None:
    """Create `folder` and its missing parents durably (each new folder's parent fsynced)."""
    _make_dirs(folder)


def rename_durable(source: Path, dest: Path) -> None:
    """Move a file or a whole folder within one file system, in one step; both parents fsynced."""
    os.rename(source, dest)
    _fsync_dir(dest.parent)
    _fsync_dir(source.parent)


def _make_dirs(folder: Path) -> None:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        # exist_ok: another download thread may create it at the same moment. The new
        # folder is only durable once its parent is synced.
        new.mkdir(exist_ok=True)
        _fsync_dir(new.parent)


def _fsync_dir(folder: Path) -> None:
    # Windows cannot open a directory for fsync; NTFS journals the rename itself.
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_json(path: Path, data: dict) -> None:
    """Write a small bookkeeping file whole or not at all (a temporary file renamed over it).

    Not fsynced: these files only pace retries and feed `status`, and losing the last
    update to a power cut costs nothing an image depends on.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
