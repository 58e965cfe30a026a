"""multipart/related (RFC 2387) as DICOMweb uses it: read streamed, written streamed.

The parser never holds a whole part in memory, so a 2 GB STOW body costs one
buffer, not 2 GB. It is fed the body as it arrives (the event loop receiving a
batch, routing.batch.BatchReceiver), or it reads it from a stream, each part a
file-like object that yields bytes up to the next delimiter (MultipartReader).
A body whose closing delimiter never comes is an error, not a short last part:
ingesting a truncated instance would be worse than refusing it.
"""

import re
import uuid
from collections import deque
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


class _EndOfPart:
    def __repr__(self) -> str:
        return "END_OF_PART"


END_OF_PART = _EndOfPart()
# What MultipartParser.feed returns, in body order: a part's headers (a dict), pieces of its
# content (bytes or memoryviews of the fed chunk), END_OF_PART, and at most one
# MalformedMultipart, after which nothing more comes.
Event = dict[str, str] | bytes | memoryview | _EndOfPart | MalformedMultipart

_PREAMBLE, _BOUNDARY_LINE, _CONTENT, _END, _FAILED = range(5)


class MultipartParser:
    """The push form: feed the body as it arrives, and get its parts back as events.

    Content passes through without a copy where it can: a fed chunk's content comes back as
    memoryviews of the chunk, and only the few bytes that may start a delimiter wait for the
    next chunk. An error is an event, not an exception, so that every part completed before
    it is still seen whole.
    """

    def __init__(self, boundary: str) -> None:
        if not _BOUNDARY.fullmatch(boundary) or boundary.endswith(" "):
            raise MalformedMultipart(
                f"The boundary {boundary[:80]!r} is not a valid multipart boundary "
                f"(1 to {_MAX_BOUNDARY} of the characters RFC 2046 allows, not ending in a space)."
            )
        # Every delimiter is CRLF + "--" + boundary; a body may start with the
        # first one without the CRLF, so pretend the CRLF was there.
        self._delimiter = b"\r\n--" + boundary.encode("ascii")
        self._buffer = bytearray(b"\r\n")
        self._state = _PREAMBLE

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if self._state == _CONTENT and len(data) >= len(self._delimiter):
            data = self._content_of(data, events)
        if self._state in (_END, _FAILED):
            return events
        self._buffer += data
        self._advance(events)
        return events

    def close(self) -> list[Event]:
        """The body has ended: an error event unless the close delimiter came."""
        if self._state in (_END, _FAILED):
            return []
        if self._state == _PREAMBLE:
            message = "The body holds no part: its boundary never appears."
        elif self._state == _CONTENT:
            message = "The body ended inside a part: the closing boundary never came."
        elif len(self._buffer) < len(self._delimiter) + 2:
            message = "The body ended inside a boundary line."
        else:
            message = "The body ended inside a part's headers."
        self._state = _FAILED
        return [MalformedMultipart(message)]

    def _content_of(self, data: bytes, events: list[Event]) -> bytes:
        """A large chunk in a part's content: its content as views, and what follows the delimiter, if any."""
        delimiter = self._delimiter
        if self._buffer:
            # A delimiter may start in the bytes held back and end in this chunk.
            window = bytes(self._buffer) + data[: len(delimiter) - 1]
            start = window.find(delimiter)
            if 0 <= start < len(self._buffer):
                return data  # the general path finds it
            events.append(bytes(self._buffer))
            self._buffer.clear()
        start = data.find(delimiter)
        if start >= 0:
            if start:
                events.append(memoryview(data)[:start])
            events.append(END_OF_PART)
            self._state = _BOUNDARY_LINE
            return data[start:]
        keep = len(delimiter) - 1
        events.append(memoryview(data)[: len(data) - keep])
        self._buffer += data[len(data) - keep :]
        return b""

    def _advance(self, events: list[Event]) -> None:
        while True:
            if self._state == _PREAMBLE:
                if not self._skip_preamble():
                    return
            elif self._state == _BOUNDARY_LINE:
                try:
                    headers = self._after_delimiter()
                except MalformedMultipart as exc:
                    self._state = _FAILED
                    events.append(exc)
                    return
                if headers is None:
                    return
                events.append(headers)
            elif self._state == _CONTENT:
                if not self._content(events):
                    return
            else:
                return

    def _skip_preamble(self) -> bool:
        start = self._buffer.find(self._delimiter)
        if start < 0:
            keep = len(self._delimiter) - 1
            if len(self._buffer) > keep:
                del self._buffer[: len(self._buffer) - keep]
            return False
        del self._buffer[:start]
        self._state = _BOUNDARY_LINE
        return True

    def _content(self, events: list[Event]) -> bool:
        start = self._buffer.find(self._delimiter)
        if start >= 0:
            if start:
                events.append(bytes(self._buffer[:start]))
                del self._buffer[:start]
            events.append(END_OF_PART)
            self._state = _BOUNDARY_LINE
            return True
        # Keep a possible partial delimiter at the end for the next chunk.
        safe = len(self._buffer) - len(self._delimiter) + 1
        if safe > 0:
            events.append(bytes(self._buffer[:safe]))
            del self._buffer[:safe]
        return False

    def _after_delimiter(self) -> dict[str, str] | None:
        """Consume a delimiter and the next part's headers: the headers, or None to wait for more bytes."""
        if len(self._buffer) < len(self._delimiter) + 2:
            return None
        if self._buffer[len(self._delimiter) : len(self._delimiter) + 2] == b"--":
            self._state = _END
            self._buffer.clear()
            return None
        end = self._buffer.find(b"\r\n\r\n", len(self._delimiter))
        if end < 0:
            if len(self._buffer) > len(self._delimiter) + _MAX_HEADER_BYTES:
                raise MalformedMultipart("A part's headers are too long or never end.")
            return None
        del self._buffer[: len(self._delimiter)]
        end -= len(self._delimiter)
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
        self._state = _CONTENT
        return headers


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
        chunks = []
        wanted = size if size is not None and size >= 0 else None
        while not self.done and (wanted is None or wanted > 0):
            event = self._reader._next()
            if event is END_OF_PART or event is None:
                self.done = True
                break
            if wanted is not None and len(event) > wanted:
                self._reader._events.appendleft(event[wanted:])
                event = event[:wanted]
            chunks.append(event)
            if wanted is not None:
                wanted -= len(event)
        return b"".join(chunks)

    def drain(self) -> None:
        while not self.done:
            self.read(_READ)


class MultipartReader:
    """Iterate over the parts of a multipart body read from `stream` (the pull form of MultipartParser)."""

    def __init__(self, stream: BinaryIO, boundary: str) -> None:
        self._parser = MultipartParser(boundary)
        self._stream = stream
        self._events: deque[Event] = deque()

    def _next(self) -> Event | None:
        """The next event, None past the close delimiter; a MalformedMultipart is raised when it is reached."""
        while not self._events:
            chunk = self._stream.read(_READ)
            self._events.extend(self._parser.feed(chunk) if chunk else self._parser.close())
            if not chunk and not self._events:
                return None
        event = self._events.popleft()
        if isinstance(event, MalformedMultipart):
            self._events.appendleft(event)  # the body stays broken for every later read
            raise event
        return event

    def __iter__(self) -> Iterator[Part]:
        while (headers := self._next()) is not None:
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
