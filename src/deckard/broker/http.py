"""The broker's front: an asyncio ``Protocol`` per client connection, HTTP/1.1 framed by h11 until upgrade.

Why a ``Protocol`` and not streams: after ``101 Switching Protocols`` the same object becomes one side of the
byte relay (``tunnel.py``) without copying through a ``StreamReader``; ``reference/platform.md`` measured a
``Protocol`` relay at twice the throughput and a fraction of the latency tail of a streams relay.

Why the head is touched before h11 sees it: QVD's own client sends HTTP/1.1 requests without a ``Host``
header, which h11 (rightly, per RFC 9112) refuses.  ``ensure_host`` inserts one into each request head; the
rest of the framing (keep-alive, ``102`` interim responses, ``101`` + trailing bytes) is h11's.  Replies
always carry ``Content-Length`` (QVD's client cannot read chunked bodies) and h11 always writes ``HTTP/1.1``.

Why the buffers are small and dropped at close: thousands of idle or slow clients must not hold memory.  Before
the upgrade a connection buffers at most one request head (``max_request_head``, larger is ``431``) plus a read
chunk, and a closed connection lets go of everything it buffered at once.

Why a ``BufferedProtocol``: the transport decrypts straight into one read buffer shared by every connection of
the thread (it is copied out before the next read), in ``READ_CHUNK`` pieces, below glibc's mmap threshold (the
broker fixes it, ``server.bound_the_heap``).  A plain ``Protocol`` makes uvloop allocate a 256 KiB ``bytes`` per
read, shrink it and join the pieces: each of them an ``mmap``, ``mremap`` and ``munmap``, which cost a fifth of
the broker's CPU when a browser uploaded a file.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Protocol, cast

import h11

MAX_HEAD = 16 * 1024  # default request head limit (BrokerSettings.max_request_head; QVD's are a few hundred bytes)
MAX_BODY = 64 * 1024  # the protocol has no request bodies; tolerate small ones, refuse floods
INBOX_LIMIT = 64 * 1024  # stop reading from a client that sends faster than we parse
READ_CHUNK = 64 * 1024  # bytes read from a client at once: under the broker's fixed 128 KiB mmap threshold
DIRECT_CHUNK = 256 * 1024  # desktop bytes read at once when the client's transport takes them without a copy
FRAME_HEADROOM = 16  # room for a WebSocket frame header (at most 10 bytes) before those bytes
WRITE_HIGH_WATER = 1024 * 1024  # large transport buffers keep the relay from stalling on every pause
HOST_HEADER = b"Host: deckard-broker\r\n"


class BadRequest(Exception):
    """The client did not speak HTTP/1.1 (or sent too much of it): answer ``status`` and close."""

    def __init__(self, message: str, *, status: int = 400, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


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


class _ReadBuffer(threading.local):
    """The read buffer of this thread's connections: a transport fills it and hands it over in one callback."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_CHUNK))


_read_buffer = _ReadBuffer()


class _DirectBuffer(threading.local):
    """This thread's buffer for desktop bytes that go to a client without a copy (``tunnel.py``): large, since
    nothing is allocated per read, with room before it for a WebSocket frame header."""

    def __init__(self) -> None:
        self.whole = memoryview(bytearray(FRAME_HEADROOM + DIRECT_CHUNK))
        self.body = self.whole[FRAME_HEADROOM:]


_direct_buffer = _DirectBuffer()


def direct_buffer() -> _DirectBuffer:
    """This thread's direct buffer: ``whole``, and ``body`` after the header room (see ``_DirectBuffer``)."""
    return _direct_buffer


def read_buffer() -> memoryview:
    """This thread's shared read buffer, for a ``BufferedProtocol.get_buffer`` whose ``buffer_updated`` copies the
    bytes out at once (``taken``)."""
    return _read_buffer.view


def taken(nbytes: int) -> bytes:
    """The ``nbytes`` a transport just read into the shared buffer, as bytes of their own."""
    return bytes(_read_buffer.view[:nbytes])


class FrontConnection(asyncio.BufferedProtocol):
    """One client connection: buffers bytes for the HTTP phase, then forwards them to a relay."""

    def __init__(self, on_open: Callable[[FrontConnection], None], peer: str = "") -> None:
        self._on_open = on_open
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.accepted_at = asyncio.get_running_loop().time()  # pre-login deadlines count from the TCP accept
        self.relay: RelaySide | None = None
        self._inbox: list[bytes] = []  # chunks as they came: joined only when more than one is taken at once
        self._inbox_size = 0
        self._wake = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.eof = False
        self.authenticated = False  # a request on this connection logged in (or redeemed a ticket)
        # (digest of the credentials, user, login) of this connection's last login: QVD's client repeats them
        self.login_memo: tuple[bytes, Any, str] | None = None
        self.on_authenticated: Callable[[FrontConnection], None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def mark_authenticated(self) -> None:
        """A login succeeded here: the connection leaves its address's pre-login count (``server.py``)."""
        if not self.authenticated:
            self.authenticated = True
            if self.on_authenticated is not None:
                self.on_authenticated(self)

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports do not subclass asyncio.Transport
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if not self.peer:
            peer = transport.get_extra_info("peername")
            self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self._on_open(self)

    def get_buffer(self, sizehint: int) -> memoryview:  # noqa: ARG002  (the buffer has one size)
        return read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(taken(nbytes))  # out of the shared buffer before the next read

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.from_client(data)
            return
        self._inbox.append(data)
        self._inbox_size += len(data)
        self._wake.set()
        if self._inbox_size > INBOX_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake.set()
        if self.relay is not None:
            self.relay.client_closed()
        return False  # close our side too: neither HTTP nor the desktop protocols use half-close

    def connection_lost(self, _exc: Exception | None) -> None:
        self.eof = True
        self._inbox, self._inbox_size = [], 0  # let go of what the client left unread, now, not when the task ends
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
        data = self.take_buffered()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        return data

    @property
    def pending(self) -> bool:
        """Whether client bytes wait to be read."""
        return bool(self._inbox)

    def take_buffered(self) -> bytes:
        chunks, self._inbox, self._inbox_size = self._inbox, [], 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def write(self, data: bytes | memoryview) -> None:
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

    def __init__(self, front: FrontConnection, max_head: int = MAX_HEAD) -> None:
        self.front = front
        self.max_head = max_head
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self._pending = bytearray()  # bytes not yet given to h11 (the head being assembled, or what follows)
        self._body = 0  # body bytes of the current request (read and dropped)
        self._request: h11.Request | None = None
        self.method = b""  # of the request being answered (a reply to HEAD has no body)

    async def _fill(self, timeout: float) -> bool:
        data = await self.front.receive(timeout)
        if not data:
            return False
        self._pending += data
        return True

    def _head_too_large(self) -> BadRequest:
        return BadRequest(
            f"the request head is larger than {self.max_head} bytes", status=431, code="request_head_too_large"
        )

    def _feed_head(self) -> bool:
        """Give h11 one complete request head (with a Host header); False while incomplete."""
        if not self._pending.strip(b"\r\n"):
            if len(self._pending) > self.max_head:  # an endless run of blank lines is a head too
                raise self._head_too_large()
            return False
        if not looks_like_http(self._pending[: self.max_head]):
            raise BadRequest("the request line is not text")
        end = _head_end(self._pending)
        if end < 0:
            if len(self._pending) > self.max_head:
                raise self._head_too_large()
            return False
        if end > self.max_head:
            raise self._head_too_large()
        head = bytes(self._pending[:end])
        del self._pending[:end]
        self.h11.receive_data(ensure_host(head))
        return True

    def feed(self, data: bytes) -> None:
        """Bytes from the client, for :meth:`next_request` (the sans-IO half, also used by the fuzzer)."""
        self._pending += data

    def next_request(self) -> h11.Request | type[h11.NEED_DATA] | None:
        """The next complete request from what was fed (its body read and dropped); ``h11.NEED_DATA`` until
        one is complete; None when the client ended the connection cleanly.  Raises :class:`BadRequest`."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint if e.error_status_hint == 431 else 400
                if status == 431:
                    raise self._head_too_large() from None
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
                return h11.NEED_DATA
            if isinstance(event, h11.Request):
                self._request = event
                self.method = event.method
                self._body = 0
            elif isinstance(event, h11.Data):
                self._body += len(event.data)
                if self._body > MAX_BODY:
                    raise BadRequest("request bodies are not expected here", status=413, code="body_too_large")
            elif isinstance(event, h11.EndOfMessage):
                request, self._request = self._request, None
                if request is None:  # pragma: no cover - h11 never ends a message it did not start
                    raise BadRequest("a message ended before it began")
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None
            elif event is h11.PAUSED:
                raise BadRequest("unexpected pipelining state")

    def at_rest(self) -> bool:
        """No partial request buffered: the client may close here without an error."""
        return self.h11.their_state is h11.IDLE and not self._pending.strip(b"\r\n")

    async def receive_request(self, timeout: float) -> h11.Request | None:
        """The next complete request (its body read and dropped); None when the client closed cleanly.

        ``timeout`` bounds the whole request, not each read: a client that sends a byte now and then is cut
        off all the same."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = self.next_request()
            if event is not h11.NEED_DATA:
                return cast(h11.Request | None, event)
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            if not await self._fill(left):
                if self.at_rest():
                    return None
                raise BadRequest("the connection closed in the middle of a request")

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
        if payload and self.method != b"HEAD":  # h11 refuses a body after HEAD (found by bench/fuzz.py)
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

    def reply_bad_request(self, message: str, status: int = 400, code: str = "bad_request") -> None:
        """An error written by hand, then close: after a parse error h11 may refuse to frame a reply."""
        body = f"{_reason(status).decode() or 'Error'}: {message}\n".encode()
        self.front.write(
            f"HTTP/1.1 {status} {_reason(status).decode()}\r\n".encode()
            + b"Content-Type: text/plain; charset=utf-8\r\n"
            + f"Content-Length: {len(body)}\r\nX-Deckard-Error: {code}\r\n".encode()
            + b"Connection: close\r\n\r\n"
            + body
        )
