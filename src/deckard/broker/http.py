"""The broker's front: an asyncio ``Protocol`` per client connection, HTTP/1.1 framed by h11 until upgrade.

Why a ``Protocol`` and not streams: after ``101 Switching Protocols`` the same object becomes one side of the
byte relay (``tunnel.py``) without copying through a ``StreamReader``; ``reference/platform.md`` measured a
``Protocol`` relay at twice the throughput and a fraction of the latency tail of a streams relay.

Why the head is touched before h11 sees it: QVD's own client sends HTTP/1.1 requests without a ``Host``
header, which h11 (rightly, per RFC 9112) refuses.  ``ensure_host`` inserts one into each request head; the
rest of the framing (keep-alive, ``102`` interim responses, ``101`` + trailing bytes) is h11's.  Replies
always carry ``Content-Length`` (QVD's client cannot read chunked bodies) and h11 always writes ``HTTP/1.1``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Protocol, cast

import h11

MAX_HEAD = 16 * 1024  # a request head larger than this is refused (QVD's are a few hundred bytes)
MAX_BODY = 64 * 1024  # the protocol has no request bodies; tolerate small ones, refuse floods
INBOX_LIMIT = 256 * 1024  # stop reading from a client that sends faster than we parse
WRITE_HIGH_WATER = 1024 * 1024  # large transport buffers keep the relay from stalling on every pause
HOST_HEADER = b"Host: deckard-broker\r\n"


class BadRequest(Exception):
    """The client did not speak HTTP/1.1: answer 400 and close."""


class RelaySide(Protocol):
    """What a front connection forwards to once upgraded (implemented by ``tunnel.Tunnel``)."""

    def from_client(self, data: bytes) -> None: ...
    def client_closed(self) -> None: ...
    def client_pause_writing(self) -> None: ...
    def client_resume_writing(self) -> None: ...
    def close(self, reason: str) -> None: ...


def _head_end(buf: bytes | bytearray) -> int:
    """Index just past the blank line ending a request head, or -1 (h11 accepts bare LF too)."""
    ends = [i + n for i, n in ((buf.find(b"\r\n\r\n"), 4), (buf.find(b"\n\n"), 2)) if i >= 0]
    return min(ends) if ends else -1


def ensure_host(head: bytes) -> bytes:
    """A request head with a ``Host`` header: QVD's client sends none, and h11 requires one for HTTP/1.1."""
    stripped = head.lstrip(b"\r\n")
    first_eol = stripped.find(b"\n")
    if first_eol < 0:
        return head
    for line in stripped[first_eol + 1 :].split(b"\n"):
        if line.split(b":", 1)[0].strip().lower() == b"host":
            return head
    return stripped[: first_eol + 1] + HOST_HEADER + stripped[first_eol + 1 :]


def looks_like_http(prefix: bytes | bytearray) -> bool:
    """False as soon as the first line holds a byte no request line can hold (binary, a TLS hello, ...)."""
    line = bytes(prefix.lstrip(b"\r\n")).split(b"\n", 1)[0].rstrip(b"\r")
    return all(32 <= b < 127 or b == 9 for b in line)


class FrontConnection(asyncio.Protocol):
    """One client connection: buffers bytes for the HTTP phase, then forwards them to a relay."""

    def __init__(self, on_open: Callable[[FrontConnection], None]) -> None:
        self._on_open = on_open
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.relay: RelaySide | None = None
        self._inbox = bytearray()
        self._wake = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.eof = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports do not subclass asyncio.Transport
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self._on_open(self)

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.from_client(data)
            return
        self._inbox += data
        self._wake.set()
        if len(self._inbox) > INBOX_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake.set()
        if self.relay is not None:
            self.relay.client_closed()
        return False  # close our side too: neither HTTP nor the desktop protocols use half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake.set()
        self._writable.set()
        if not self.closed.done():
            self.closed.set_result(None)
        if self.relay is not None:
            self.relay.client_closed()

    def pause_writing(self) -> None:
        self._writable.clear()
        if self.relay is not None:
            self.relay.client_pause_writing()

    def resume_writing(self) -> None:
        self._writable.set()
        if self.relay is not None:
            self.relay.client_resume_writing()

    # used by the HTTP phase
    @property
    def gone(self) -> bool:
        return self.closed.done() or self.transport is None or self.transport.is_closing()

    async def receive(self, timeout: float) -> bytes:
        """Bytes buffered so far (waiting up to ``timeout`` for some); b"" at end of stream."""
        if not self._inbox and not self.eof:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                raise TimeoutError from None
        data = bytes(self._inbox)
        self._inbox.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        return data

    def take_buffered(self) -> bytes:
        data = bytes(self._inbox)
        self._inbox.clear()
        return data

    def write(self, data: bytes) -> None:
        if not self.gone and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        await self._writable.wait()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class HttpChannel:
    """HTTP/1.1 framing over a front connection: requests in, Content-Length replies and interim 1xx out."""

    def __init__(self, front: FrontConnection) -> None:
        self.front = front
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._pending = bytearray()  # bytes not yet given to h11 (the head being assembled, or what follows)

    async def _fill(self, timeout: float) -> bool:
        data = await self.front.receive(timeout)
        if not data:
            return False
        self._pending += data
        return True

    def _feed_head(self) -> bool:
        """Give h11 one complete request head (with a Host header); False while incomplete."""
        if not self._pending.strip(b"\r\n"):
            return False
        if not looks_like_http(self._pending):
            raise BadRequest("the request line is not text")
        end = _head_end(self._pending)
        if end < 0:
            if len(self._pending) > MAX_HEAD:
                raise BadRequest("the request head is too large")
            return False
        head = bytes(self._pending[:end])
        del self._pending[:end]
        self.h11.receive_data(ensure_host(head))
        return True

    async def receive_request(self, timeout: float) -> h11.Request | None:
        """The next complete request (its body read and dropped); None when the client closed cleanly."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request: h11.Request | None = None
        body = 0
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                raise BadRequest(str(e)) from None
            if event is h11.NEED_DATA:
                if self.h11.their_state is h11.IDLE:
                    if self._feed_head():
                        continue
                elif self._pending:
                    # inside a body: h11 counts Content-Length itself
                    self.h11.receive_data(bytes(self._pending))
                    self._pending.clear()
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError
                if not await self._fill(left):
                    if self.h11.their_state is h11.IDLE and not self._pending.strip(b"\r\n"):
                        return None
                    raise BadRequest("the connection closed in the middle of a request")
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > MAX_BODY:
                    raise BadRequest("request bodies are not expected here")
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None
            elif event is h11.PAUSED:
                raise BadRequest("unexpected pipelining state")

    def _send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            self.front.write(data)

    def respond(
        self,
        status: int,
        body: bytes | str = b"",
        *,
        headers: Iterable[tuple[str, str]] = (),
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        """A complete reply with Content-Length (never chunked)."""
        payload = body.encode() if isinstance(body, str) else body
        hdrs = [("Content-Type", content_type), ("Content-Length", str(len(payload))), *headers]
        self._send(h11.Response(status_code=status, headers=hdrs, reason=_reason(status)))
        if payload:
            self._send(h11.Data(data=payload))
        self._send(h11.EndOfMessage())

    def inform(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """An interim 1xx reply (``102 Processing`` with progress, ``101`` to switch)."""
        self._send(h11.InformationalResponse(status_code=status, headers=list(headers), reason=_reason(status)))

    def switch_protocols(self, headers: Iterable[tuple[str, str]]) -> bytes:
        """Send ``101`` and leave HTTP; returns the client bytes that already followed the request."""
        self.inform(101, headers)
        return self.leave()

    def leave(self) -> bytes:
        """Leave HTTP after a ``101`` written by someone else (the WebSocket handshake); returns the bytes
        the client sent after its request."""
        trailing, _closed = self.h11.trailing_data
        data = trailing + bytes(self._pending) + self.front.take_buffered()
        self._pending.clear()
        return data

    def next_cycle(self) -> bool:
        """After a reply: True to read another request on this connection (keep-alive)."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    def reply_bad_request(self, message: str) -> None:
        """400 written by hand: after a parse error h11 may refuse to frame a reply."""
        body = f"Bad request: {message}\n".encode()
        self.front.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
            + f"Content-Length: {len(body)}\r\n".encode()
            + b"Connection: close\r\n\r\n"
            + body
        )
