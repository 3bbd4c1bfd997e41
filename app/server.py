"""The HTTP server's own limits, below the ASGI app: time to send the request headers.

uvicorn times out an idle keep-alive connection, but not one that is slowly sending its headers
(nor a fresh connection that sends nothing): fifty clients sending a byte a second held fifty
connections for as long as they liked. `with_header_timeout` gives each request `seconds` from its
first byte (or from the connection, for the first one) to complete its headers; past that the client
gets 408 and the connection is closed. The body's deadline is enforced in the app
(app.http_limits), where a 408 can be answered properly.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"detail": f"the request headers were not received within {seconds:g} s"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def with_header_timeout(seconds: float, base: type[asyncio.Protocol] = AutoHTTPProtocol) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools or h11), closing connections slow to send headers."""

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _cycle_at_start: object = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._start_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._start_header_timer()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._cycle_at_start:
                self._stop_header_timer()  # headers complete: the request now has its own cycle

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _start_header_timer(self) -> None:
            self._cycle_at_start = self.cycle
            self._header_timer = self.loop.call_later(seconds, self._headers_timed_out)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(_timeout_response(seconds))
                self.transport.close()

    return HeaderTimeoutProtocol
