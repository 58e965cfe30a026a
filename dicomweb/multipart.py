"""multipart/related (RFC 2387) as DICOMweb uses it: read streamed, written streamed.

The reader never holds a whole part in memory: each part is a file-like object
that yields bytes up to the next delimiter, so a 2 GB STOW body costs one
buffer, not 2 GB. A body whose closing delimiter never comes is an error, not a
short last part: ingesting a truncated instance would be worse than refusing it.
"""

import re
import uuid
from collections.abc import Iterable, Iterator
from typing import BinaryIO

_READ = 256 * 1024
_MAX_HEADER_BYTES = 16 * 1024
# RFC 2046 caps a boundary at 70 characters, but real peers exceed it: Orthanc's
# DICOMweb client joins two UUIDs into a 73-character one. Refusing it would shut
# every Orthanc out, so any length up to 200 is read. The bound keeps the
# delimiter, which the reader searches for and holds back at a buffer's end, a
# short constant; the RFC's character set is still enforced.
_MAX_BOUNDARY = 200
_BOUNDARY = re.compile(rf"[0-9A-Za-z'()+_,\-./:=? ]{{1,{_MAX_BOUNDARY}}}")


class MalformedMultipart(ValueError):
    """The body is not the multipart/related message its Content-Type announced."""


def media_type_params(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type or Accept item into its lowercased type and its parameters."""
    media_type, *rest = value.split(";")
    params = {}
    for item in rest:
        name, _, param = item.partition("=")
        if name.strip():
            params[name.strip().lower()] = param.strip().strip('"')
    return media_type.strip().lower(), params


class Part:
    """One body part: its headers, and its content as a stream read up to the next delimiter."""

    def __init__(self, reader: "MultipartReader", headers: dict[str, str]) -> None:
        self._reader = reader
        self.headers = headers
        self.done = False

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def read(self, size: int = -1) -> bytes:
        if self.done:
            return b""
        chunks = []
        wanted = size if size is not None and size >= 0 else None
        while wanted is None or wanted > 0:
            chunk = self._reader._content(wanted if wanted is not None else _READ)
            if chunk is None:
                self.done = True
                break
            chunks.append(chunk)
            if wanted is not None:
                wanted -= len(chunk)
        return b"".join(chunks)

    def drain(self) -> None:
        while not self.done:
            self.read(_READ)


class MultipartReader:
    """Iterate over the parts of a multipart body read from `stream`."""

    def __init__(self, stream: BinaryIO, boundary: str) -> None:
        if not _BOUNDARY.fullmatch(boundary) or boundary.endswith(" "):
            raise MalformedMultipart(
                f"The boundary {boundary[:80]!r} is not a valid multipart boundary "
                f"(1 to {_MAX_BOUNDARY} of the characters RFC 2046 allows, not ending in a space)."
            )
        self._stream = stream
        # Every delimiter is CRLF + "--" + boundary; a body may start with the
        # first one without the CRLF, so pretend the CRLF was there.
        self._delimiter = b"\r\n--" + boundary.encode("ascii")
        self._buffer = bytearray(b"\r\n")
        self._eof = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = self._stream.read(_READ)
        if not chunk:
            self._eof = True
            return False
        self._buffer += chunk
        return True

    def _content(self, size: int) -> bytes | None:
        """Up to `size` bytes of the current part, or None once its delimiter is reached."""
        while True:
            index = self._buffer.find(self._delimiter)
            if index == 0:
                return None
            if index > 0:
                take = min(index, size)
            else:
                # Keep a possible partial delimiter at the end for the next read.
                safe = len(self._buffer) - len(self._delimiter) + 1
                take = min(safe, size) if safe > 0 else 0
            if take > 0:
                chunk = bytes(self._buffer[:take])
                del self._buffer[:take]
                return chunk
            if not self._fill():
                raise MalformedMultipart("The body ended inside a part: the closing boundary never came.")

    def _after_delimiter(self) -> dict[str, str] | None:
        """Consume a delimiter; return the next part's headers, or None after the close delimiter."""
        while len(self._buffer) < len(self._delimiter) + 2:
            if not self._fill():
                raise MalformedMultipart("The body ended inside a boundary line.")
        del self._buffer[: len(self._delimiter)]
        if self._buffer[:2] == b"--":
            return None
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > _MAX_HEADER_BYTES:
                raise MalformedMultipart("A part's headers are too long or never end.")
            if not self._fill():
                raise MalformedMultipart("The body ended inside a part's headers.")
        # Transport padding (spaces, tabs) may follow the boundary before CRLF.
        line_end = self._buffer.find(b"\r\n")
        if self._buffer[:line_end].strip(b" \t"):
            raise MalformedMultipart("Unexpected characters after a boundary.")
        # With no headers, the boundary line's CRLF starts the empty line.
        raw_headers = bytes(self._buffer[line_end + 2 : end]) if end > line_end else b""
        del self._buffer[: end + 4]
        headers = {}
        for line in filter(None, raw_headers.split(b"\r\n")):
            name, sep, value = line.partition(b":")
            if not sep:
                raise MalformedMultipart("A part header line has no ':'.")
            headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
        return headers

    def __iter__(self) -> Iterator[Part]:
        # Skip the preamble, up to the first delimiter.
        while self._buffer.find(self._delimiter) < 0:
            keep = len(self._delimiter) - 1
            if len(self._buffer) > keep:
                del self._buffer[: len(self._buffer) - keep]
            if not self._fill():
                raise MalformedMultipart("The body holds no part: its boundary never appears.")
        del self._buffer[: self._buffer.find(self._delimiter)]
        while True:
            headers = self._after_delimiter()
            if headers is None:
                return
            part = Part(self, headers)
            yield part
            part.drain()


def new_boundary() -> str:
    return f"dicomweb-{uuid.uuid4().hex}"


def multipart_stream(parts: Iterable[tuple[dict[str, str], Iterable[bytes]]], boundary: str) -> Iterator[bytes]:
    """Write parts lazily: each part is (headers, chunks of content)."""
    delimiter = f"--{boundary}".encode("ascii")
    for headers, chunks in parts:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        yield delimiter + b"\r\n" + head.encode("latin-1") + b"\r\n"
        yield from chunks
        yield b"\r\n"
    yield delimiter + b"--\r\n"
