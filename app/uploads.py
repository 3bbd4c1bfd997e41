"""Streaming multipart/form-data reader for image uploads.

Starlette's form parser spools every file to a temporary file before the route sees it, so an
over-sized upload is only noticed after it has been received in full. This reader counts bytes as
they arrive and stops at the first file over the limit, the first file over the count limit, or a
body larger than both limits allow; it keeps each accepted file in memory (at most the limit).
Every body, small or large, whole or in chunks, goes through the same splitter (`MultipartSplitter`),
so what is accepted never depends on the body's size.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from app.http_limits import allow_body_bytes
from python_multipart.multipart import parse_options_header

from app.errors import Rejected

# The multipart field that carries the images.
FILE_FIELD = "file"

# Room for part headers and boundaries on top of the file bytes themselves.
PART_OVERHEAD_BYTES = 16 * 1024

# A part's header lines, at most (a real client sends ~100-300 bytes).
MAX_PART_HEADER_BYTES = 8 * 1024


@dataclass
class Upload:
    filename: str
    content_type: str
    data: bytearray = field(default_factory=bytearray)


class UploadRejected(Rejected):
    """The body cannot be accepted."""


class MissingFileField(UploadRejected):
    def __init__(self, field_name: str) -> None:
        super().__init__(422, f"no file in the multipart field {field_name!r}")


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB"


class _Collector:
    """python-multipart callbacks that keep the parts named `field_name`, enforcing the limits."""

    def __init__(self, field_name: str, max_files: int, max_bytes: int) -> None:
        self.field_name = field_name
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.files: list[Upload] = []
        self.finished = False
        self._current: Upload | None = None  # None while inside a part we ignore
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._content_type = b""

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._current = None
        self._disposition = self._content_type = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        name = self._header_name.strip().lower()
        if name == b"content-disposition":
            self._disposition = self._header_value
        elif name == b"content-type":
            self._content_type = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name", b"").decode("utf-8", "replace") != self.field_name:
            return  # another form field: its bytes are counted against the body limit and dropped
        if len(self.files) >= self.max_files:
            raise UploadRejected(413, f"too many files: at most {self.max_files} per request")
        filename = options.get(b"filename", b"").decode("utf-8", "replace")
        self._current = Upload(filename=filename, content_type=self._content_type.decode("latin-1").strip())
        self.files.append(self._current)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is None:
            return
        if len(self._current.data) + (end - start) > self.max_bytes:
            name = self._current.filename or f"#{len(self.files)}"
            raise UploadRejected(413, f"file {name!r} is larger than the upload limit of "
                                      f"{_megabytes(self.max_bytes)}")
        self._current.data += data[start:end]

    def on_end(self) -> None:
        self.finished = True


def _malformed(reason: str) -> UploadRejected:
    return UploadRejected(400, f"malformed multipart body: {reason}")


# RFC 7230 token characters: a header name is made of these, with nothing between it and its colon.
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_PADDING = b" \t"  # RFC 2046 transport padding, allowed between a boundary and its line break
_NEED_MORE, _CLOSING, _NOT_A_BOUNDARY = -1, -2, -3


class MultipartSplitter:
    """An incremental multipart/form-data (RFC 7578) splitter: `feed` chunks of any size, then `close`.

    It makes python-multipart's callbacks on the collector. The same code reads every body, whole or
    in chunks, so what is accepted cannot depend on the body's size: the body starts with the
    boundary (no preamble); a boundary line is the boundary, optional spaces or tabs, CRLF (or `--`
    to close); header lines are `name: value` with a token name; a part's headers stay under
    MAX_PART_HEADER_BYTES; part data ends at CRLF + a boundary line (a boundary followed by anything
    else is data); what follows the closing boundary is ignored. Boundaries are found with
    `bytes.find`, far cheaper than walking the bytes in Python."""

    def __init__(self, boundary: bytes, collector: _Collector) -> None:
        self.collector = collector
        self.delimiter = b"--" + boundary
        self.data_delimiter = b"\r\n" + self.delimiter
        self.buffer = bytearray()
        self.state = "start"  # start -> headers -> data -> headers -> data ... -> end

    def feed(self, chunk: bytes) -> None:
        if self.state != "end":
            self.buffer += chunk
            while self._step():
                pass

    def close(self) -> None:
        if self.state != "end":
            raise _malformed("it ends before the closing boundary")

    def _boundary_line(self, at: int) -> int:
        """What follows a boundary that ends at `at`: the offset of the next part's headers, or
        _CLOSING, _NOT_A_BOUNDARY, or _NEED_MORE when the buffered bytes cannot tell yet."""
        buffer = self.buffer
        if len(buffer) < at + 2:
            return _NEED_MORE
        if buffer[at:at + 2] == b"--":
            return _CLOSING
        end = at
        while end < len(buffer) and buffer[end] in _PADDING:
            end += 1
        if end - at > MAX_PART_HEADER_BYTES:
            return _NOT_A_BOUNDARY
        if len(buffer) < end + 2:
            return _NEED_MORE
        return end + 2 if buffer[end:end + 2] == b"\r\n" else _NOT_A_BOUNDARY

    def _step(self) -> bool:
        """Advance as far as the buffered bytes allow; True when there may be more to do."""
        if self.state == "start":
            return self._start()
        if self.state == "headers":
            return self._headers()
        if self.state == "data":
            return self._data()
        return False

    def _start(self) -> bool:
        buffer = self.buffer
        if not buffer.startswith(self.delimiter[:len(buffer)]) or \
                (len(buffer) >= len(self.delimiter) and not buffer.startswith(self.delimiter)):
            raise _malformed("it does not start with the boundary")
        if len(buffer) < len(self.delimiter):
            return False
        after = self._boundary_line(len(self.delimiter))
        if after == _NEED_MORE:
            return False
        if after == _NOT_A_BOUNDARY:
            raise _malformed("expected a line break after the boundary")
        if after == _CLOSING:
            return self._finish()
        del buffer[:after]
        self.state = "headers"
        return True

    def _headers(self) -> bool:
        buffer, c = self.buffer, self.collector
        if buffer.startswith(b"\r\n"):
            end, block = 0, b""  # a part without headers
        else:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_PART_HEADER_BYTES:
                    raise _malformed(f"a part's headers are longer than {MAX_PART_HEADER_BYTES} bytes")
                return False
            if end > MAX_PART_HEADER_BYTES:
                raise _malformed(f"a part's headers are longer than {MAX_PART_HEADER_BYTES} bytes")
            block = bytes(buffer[:end])
            end += 2
        c.on_part_begin()
        for line in block.split(b"\r\n") if block else ():
            name, colon, value = line.partition(b":")
            if not colon or not name or not _TOKEN.issuperset(name):
                raise _malformed(f"bad header line in a part: {line[:40]!r}")
            value = value.strip(_PADDING)
            c.on_header_field(name, 0, len(name))
            c.on_header_value(value, 0, len(value))
            c.on_header_end()
        c.on_headers_finished()
        del buffer[:end + 2]
        self.state = "data"
        return True

    def _emit(self, length: int) -> None:
        if length > 0:
            self.collector.on_part_data(bytes(self.buffer[:length]), 0, length)
            del self.buffer[:length]

    def _data(self) -> bool:
        buffer, search_from = self.buffer, 0
        while True:
            found = buffer.find(self.data_delimiter, search_from)
            if found < 0:  # keep what may be the start of a delimiter cut across chunks
                self._emit(len(buffer) - min(len(buffer), len(self.data_delimiter) - 1))
                return False
            after = self._boundary_line(found + len(self.data_delimiter))
            if after == _NOT_A_BOUNDARY:
                search_from = found + 1
                continue
            self._emit(found)
            if after == _NEED_MORE:
                return False
            if after == _CLOSING:
                return self._finish()
            del buffer[:after - found]
            self.state = "headers"
            return True

    def _finish(self) -> bool:
        self.state = "end"
        self.buffer.clear()  # the epilogue, ignored by the spec
        self.collector.on_end()
        return False


async def read_files(content_type: str | None, content_length: str | None, stream: AsyncIterator[bytes], *,
                     field_name: str, max_files: int, max_bytes: int) -> list[Upload]:
    """The uploaded files of one field, in upload order, read from the body as it streams in."""
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        raise UploadRejected(415, f"expected a multipart/form-data body with images in the field "
                                  f"{field_name!r}, got content type {content_type or 'none'!r}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadRejected(400, "multipart/form-data content type without a boundary")
    max_body = max_files * (max_bytes + PART_OVERHEAD_BYTES)
    declared = int(content_length) if content_length is not None and content_length.isdigit() else None
    if declared is not None and declared > max_body:
        raise UploadRejected(413, f"request body of {declared} bytes is larger than "
                                  f"{max_files} files of {_megabytes(max_bytes)} can be")
    collector = _Collector(field_name, max_files, max_bytes)
    splitter = MultipartSplitter(boundary, collector)
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > max_body:
            raise UploadRejected(413, f"request body is larger than {max_files} files of "
                                      f"{_megabytes(max_bytes)} can be")
        splitter.feed(chunk)
        if collector.finished:
            break  # anything after the closing boundary is an epilogue, ignored by the spec
    splitter.close()
    if not collector.finished:
        raise _malformed("it ends before the closing boundary")
    if not collector.files:
        raise MissingFileField(field_name)
    return collector.files


async def read_request_files(request: Request, *, field_name: str, max_files: int, max_bytes: int) -> list[Upload]:
    """`read_files` on a request: the uploads of `field_name`, under this route's own limits (which
    replace the general body limit of app.http_limits)."""
    allow_body_bytes(request, None)
    return await read_files(request.headers.get("content-type"), request.headers.get("content-length"),
                            request.stream(), field_name=field_name, max_files=max_files, max_bytes=max_bytes)
