"""Serve an ASGI app with uvicorn, closing connections whose request does not arrive in time.

uvicorn only times out idle keep-alive connections. A client that connects and sends
nothing, half a request line, or headers announcing a body it never sends holds its
connection, and a file descriptor, for as long as it likes; a few hundred such clients
stall the server. Here each request must arrive within two deadlines: its request line
and headers within `header_timeout_s` of the connection opening (or of the first byte
of a later request on a kept-alive connection), and its body within `body_timeout_s`
of the headers. A late request is answered 408 and its connection closed; if a response
to it is already under way, the connection is just closed. The request line and headers
may also take at most `max_header_bytes` (431), which httptools does not limit at all.
A request with more than one Host header is answered 400 (RFC 9112, section 3.2): the
apps read the first, and whatever routes by another would see a request that passed a
host check it never had.

Both servers (`python -m aggregator`, `python -m web_demo`) bind their port first (`bind`), then serve on it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from typing import Any, Literal

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from keyboard_model.errors import UserFacingError

# Headers are a few hundred bytes; any client gets them out in well under this.
HEADER_TIMEOUT_S = 10.0
# A model update is a few MB: this is room for a phone uploading at about 1 Mbit/s.
BODY_TIMEOUT_S = 60.0
# httptools itself sets no limit on a request line and headers, so within the header deadline a client could
# fill memory with them; uvicorn's h11 parser stops at 16 KiB by default.
MAX_HEADER_BYTES = 64 * 1024

logger = logging.getLogger("uvicorn.error")


class DeadlineHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline on reading each request's headers and then its body, and a cap
    on the size of its headers."""

    def __init__(self, *args: Any, header_timeout_s: float, body_timeout_s: float, max_header_bytes: int,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_header_bytes = max_header_bytes
        self._reading: Literal["headers", "body"] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        # Why the request being parsed is refused as malformed, when it is for a reason of ours.
        self._refusal: str | None = None

    def _start_reading(self, part: Literal["headers", "body"]) -> None:
        self._stop_reading()
        self._reading = part
        seconds = self.header_timeout_s if part == "headers" else self.body_timeout_s
        self._deadline = self.loop.call_later(seconds, self._timed_out)

    def _stop_reading(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._reading, self._deadline, self._header_bytes = None, None, 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # From the connection, not the first byte: a client that sends nothing at all is stalling too.
        self._start_reading("headers")

    def data_received(self, data: bytes) -> None:
        deadline = self._deadline
        super().data_received(data)
        # Only a chunk that ends the way it began, waiting for the same request's headers, is all header bytes:
        # one that completes them may carry body, and one that starts a pipelined request the previous body.
        if self._reading == "headers" and self._deadline is deadline and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse(431, f"the request line and headers exceed {self.max_header_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host" and any(known == b"host" for known, _ in self.headers):
            self._refusal = "a request may have one Host header, not more"
            # An exception in a parser callback stops the parser; uvicorn answers that with a 400 and closes.
            raise ValueError(self._refusal)
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        super().send_400_response(self._refusal or msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._reading is None:  # a later request on a kept-alive connection
            self._start_reading("headers")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._start_reading("body")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._stop_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_reading()
        super().connection_lost(exc)

    def _timed_out(self) -> None:
        part = self._reading
        limit = self.header_timeout_s if part == "headers" else self.body_timeout_s
        self._deadline = None
        if not self.transport.is_closing():
            logger.warning("Closing a connection whose request %s did not arrive within %g s.", part, limit)
            self._refuse(408, f"the request {part} did not arrive within {limit:g} s")

    def _refuse(self, status: int, reason: str) -> None:
        """Answer `status` if a response can still be sent, and close the connection."""
        cycle = self.cycle  # reading headers, the previous request's; reading a body, this one's
        if self._reading == "body":
            # Not while an earlier pipelined request waits for its response: ours would go out in its place.
            can_answer = not self.pipeline and not cycle.response_started
            if can_answer:
                # The app may be waiting for the rest of the body: as when a client goes away, it reads a
                # disconnect and whatever it answers is dropped, so ours is the only response.
                cycle.disconnected = True
                cycle.message_event.set()
        else:
            # Likewise while the previous request's response is under way.
            can_answer = cycle is None or cycle.response_complete
        if can_answer:
            body = reason.encode("ascii")
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [b"content-type: text/plain; charset=utf-8\r\n", b"content-length: %d\r\n" % len(body),
                     b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
        self.transport.close()


def uvicorn_options(*, header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S,
                    max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Keyword arguments of `uvicorn.run` and `uvicorn.Config` that put the deadlines and the header cap on every
    connection."""
    if not (header_timeout_s > 0 and body_timeout_s > 0 and max_header_bytes > 0):
        raise ValueError(f"timeouts and max_header_bytes must be positive, got {header_timeout_s}, {body_timeout_s} "
                         f"and {max_header_bytes}")
    protocol = functools.partial(DeadlineHttpProtocol, header_timeout_s=header_timeout_s,
                                 body_timeout_s=body_timeout_s, max_header_bytes=max_header_bytes)
    # ws="none": neither server speaks WebSocket, and an upgraded connection would leave the deadlines behind.
    return {"http": protocol, "ws": "none"}


def bind(host: str, port: int, option: str = "--port") -> socket.socket:
    """A socket listening on `host`:`port` (0: a free port), made before any other work so that a port in use is
    reported at once, naming `option`. Serving on it later leaves no moment in which another program can take it."""
    try:
        listener = socket.create_server((host, port), family=_family(host), backlog=2048)
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise UserFacingError(f"{option}: cannot listen on {host}:{port}: {reason}") from None
    listener.set_inheritable(True)  # a child process may serve on it (aggregator/process.py)
    return listener


def bound_port(listener: socket.socket) -> int:
    return listener.getsockname()[1]


def serve(app: Any, listener: socket.socket) -> None:
    """Serve `app` on `listener` until SIGINT or SIGTERM, closing connections whose request comes too slowly."""
    config = uvicorn.Config(app, log_level="warning", **uvicorn_options())
    uvicorn.Server(config).run(sockets=[listener])


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
