"""Streaming multipart/form-data reader for image uploads.

Starlette's form parser spools every file to a temporary file before the route sees it, so an
over-sized upload is only noticed after it has been received in full. This reader counts bytes as
they arrive and stops at the first file over the limit, the first file over the count limit, or a
body larger than both limits allow; it keeps each accepted file in memory (at most the limit).
A small body with a declared length (up to 256 kB, e.g. a cropped sign image) is read whole first
and split in memory, which is cheaper; both paths feed the same limit-checking collector.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from app.http_limits import allow_body_bytes
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

# Room for part headers and boundaries on top of the file bytes themselves.
PART_OVERHEAD_BYTES = 16 * 1024

# A body whose declared length is at most this is read whole and split in memory with `bytes.find`:
# python-multipart walks the part headers byte by byte in Python, the reader's main cost in profiles.
IN_MEMORY_BODY_BYTES = 256 * 1024


@dataclass
class Upload:
    filename: str
    content_type: str
    data: bytearray = field(default_factory=bytearray)


class UploadRejected(Exception):
    """The body cannot be accepted; `status_code` is the HTTP status to answer with."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


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


def split_in_memory(body: bytes, boundary: bytes, collector: _Collector) -> None:
    """Feed a complete multipart body (RFC 7578) to `collector`, the same callbacks in the same order
    as python-multipart's streaming parser makes them."""
    delimiter = b"--" + boundary
    if not body.startswith(delimiter):  # python-multipart takes no preamble either
        raise _malformed("it does not start with the boundary")
    position = len(delimiter)
    while not body.startswith(b"--", position):
        line_end = body.find(b"\r\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise _malformed("expected a line break after the boundary")
        headers_end = body.find(b"\r\n\r\n", line_end)
        if headers_end < 0:
            raise _malformed("a part's headers do not end")
        collector.on_part_begin()
        for line in body[line_end + 2:headers_end].split(b"\r\n") if headers_end > line_end else ():
            name, colon, value = line.partition(b":")
            if not colon:
                raise _malformed(f"header line without a colon: {line[:40]!r}")
            collector.on_header_field(name, 0, len(name))
            value = value.strip()
            collector.on_header_value(value, 0, len(value))
            collector.on_header_end()
        collector.on_headers_finished()
        data_end = body.find(b"\r\n" + delimiter, headers_end + 4)
        if data_end < 0:
            raise _malformed("it ends before the closing boundary")
        collector.on_part_data(body, headers_end + 4, data_end)
        position = data_end + 2 + len(delimiter)
    collector.on_end()


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
    if declared is not None and declared <= IN_MEMORY_BODY_BYTES:
        split_in_memory(await _read_at_most(stream, declared), boundary, collector)
    else:
        await _parse_streaming(stream, boundary, collector, max_body, max_files, max_bytes)
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


async def _read_at_most(stream: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, which its Content-Length says is `limit` bytes (the server enforces that)."""
    chunks, received = [], 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise _malformed("the body is longer than its Content-Length")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_streaming(stream: AsyncIterator[bytes], boundary: bytes, collector: _Collector, max_body: int,
                           max_files: int, max_bytes: int) -> None:
    try:
        parser = MultipartParser(boundary, collector.callbacks())
        received = 0
        async for chunk in stream:
            received += len(chunk)
            if received > max_body:
                raise UploadRejected(413, f"request body is larger than {max_files} files of "
                                          f"{_megabytes(max_bytes)} can be")
            parser.write(chunk)
            if collector.finished:
                break  # anything after the closing boundary is an epilogue, ignored by the spec
        parser.finalize()
    except FormParserError as exc:
        raise _malformed(str(exc)) from None
