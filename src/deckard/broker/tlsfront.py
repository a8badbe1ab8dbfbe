"""The broker's TLS front: an asyncio transport over a non-blocking ``ssl.SSLSocket`` (OpenSSL writes the socket).

Why not the event loop's own TLS (``connect_accepted_socket(ssl=...)``): asyncio and uvloop run OpenSSL on
memory BIOs.  Every byte a desktop sends is then copied into OpenSSL's record buffer, out of it into the
outgoing memory BIO, out of the BIO into a ``bytes`` and only then written to the socket; ``perf`` on the relay
of a full-screen stream (``bench/datapath.py``) found ``memmove`` at 29 % of the broker's CPU, more than the
encryption itself (21 %).  With the socket as OpenSSL's BIO, as socat uses it, a record is encrypted in
OpenSSL's buffer and written from there: one copy, no ``bytes`` per write.

The transport keeps asyncio's contract for what the broker uses (``http.FrontConnection`` is its protocol,
a ``BufferedProtocol``): ``write`` never blocks (what the socket does not take waits, in order, and the
protocol is told to pause above the high-water mark), ``pause_reading``/``resume_reading``, ``close`` (flush,
then TLS ``close_notify``), ``abort``, ``connection_lost`` exactly once.  Two OpenSSL rules shape it:

* a ``write`` that returned *want write* must be retried with the same bytes, so a write the socket did not
  finish keeps its own copy (only then is anything copied);
* OpenSSL may hold decrypted bytes the socket no longer signals (``pending``), so a read runs until OpenSSL
  wants more from the socket, a few records at a time, and schedules itself again when it stops early.

Because a write copies nothing it can send, the relay hands it desktop bytes straight from its read buffer
(``copies_unsent``; ``tunnel.py``).  A write of several records is corked: OpenSSL writes each 16 KiB record
on its own, and the kernel would push each through the stack as a segment of its own.  What is left of the
cost is the encryption and the system calls, as for socat; going below that needs kernel TLS, which the
machines here lack (``docs/benchmarks.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections import deque
from typing import Any

READS_PER_TURN = 8  # records read per readiness callback before other connections get a turn
RECORD = 16 * 1024  # TLS's largest record
HIGH_WATER = 64 * 1024  # asyncio's default write-buffer limits
_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


async def accept_tls(
    conn: socket.socket, context: ssl.SSLContext, protocol: asyncio.BufferedProtocol, timeout: float
) -> TlsTransport:
    """The TLS handshake on an accepted socket (at most ``timeout`` s), then ``protocol``'s ``connection_made``."""
    loop = asyncio.get_running_loop()
    conn.setblocking(False)
    with contextlib.suppress(OSError):  # as asyncio's TCP transports: records go out as written, not after an ACK
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
    fd = sock.fileno()
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    sock.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await _ready(loop, fd, loop.add_reader, loop.remove_reader)
                except ssl.SSLWantWriteError:
                    await _ready(loop, fd, loop.add_writer, loop.remove_writer)
    except BaseException:
        _drain(fd)
        sock.close()
        raise
    transport = TlsTransport(loop, sock, protocol)
    transport.start()
    return transport


def _drain(fd: int, limit: int = 256 * 1024) -> None:
    """Read what the client sent and OpenSSL left (a plain HTTP request, say), so that closing sends FIN, not RST
    (the kernel resets a connection closed with unread bytes, and the client would see a reset, not the alert)."""
    with contextlib.suppress(OSError):
        while limit > 0 and (chunk := os.read(fd, 65536)):
            limit -= len(chunk)


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, add: Any, remove: Any) -> None:
    """Until ``fd`` is readable (or writable: ``add``/``remove`` say which)."""
    waiter: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    add(fd, ready)
    try:
        await waiter
    finally:
        remove(fd)


class TlsTransport(asyncio.Transport):
    """One client's TLS connection, serving a ``BufferedProtocol`` (see the module's docstring)."""

    copies_unsent = True

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, protocol: asyncio.BufferedProtocol):
        extra: dict[str, Any] = {"socket": sock, "ssl_object": sock, "sslcontext": sock.context}
        with contextlib.suppress(OSError):
            extra["peername"], extra["sockname"] = sock.getpeername(), sock.getsockname()
        super().__init__(extra)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._unfinished: bytes | None = None  # a write OpenSSL must be given again, as it was
        self._backlog: deque[bytes] = deque()  # writes waiting behind it
        self._buffered = 0  # bytes of both
        self._high, self._low = HIGH_WATER, HIGH_WATER // 4
        self._reading = False
        self._paused_reading = False
        self._writing = False  # the writer callback is registered
        self._read_needs_write = False  # a read stopped until the socket takes OpenSSL's answer
        self._protocol_paused = False
        self._closing = False
        self._lost = False

    def start(self) -> None:
        self._protocol.connection_made(self)
        if not self._paused_reading and not self._closing:
            self._watch_reads()

    # reading
    def _watch_reads(self) -> None:
        if not self._reading:
            self._loop.add_reader(self._fd, self._read_ready)
            self._reading = True
        if self._sock.pending():
            self._loop.call_soon(self._read_ready)

    def _unwatch_reads(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _read_ready(self) -> None:
        for _ in range(READS_PER_TURN):
            if self._paused_reading or self._closing:
                return
            buf = self._protocol.get_buffer(-1)
            try:
                n = self._sock.recv_into(buf)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:  # OpenSSL must answer (a TLS 1.3 key update) and the socket is full
                self._read_needs_write = True
                self._watch_writes()
                return
            except ssl.SSLZeroReturnError:
                n = 0
            except (OSError, ssl.SSLError) as e:
                self._end(e, notify=False)
                return
            if n == 0:
                self._eof()
                return
            self._protocol.buffer_updated(n)
        if self._sock.pending() and not self._closing:
            self._loop.call_soon(self._read_ready)

    def _eof(self) -> None:
        self._unwatch_reads()
        if not self._protocol.eof_received():
            self.close()

    def pause_reading(self) -> None:
        if not self._closing:
            self._paused_reading = True
            self._unwatch_reads()

    def resume_reading(self) -> None:
        if self._paused_reading and not self._closing:
            self._paused_reading = False
            self._watch_reads()

    def is_reading(self) -> bool:
        return not self._paused_reading and not self._closing

    # writing
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if self._unfinished is None:
            try:
                sent = self._send(data)
            except _WANT:
                sent = 0
            except (OSError, ssl.SSLError) as e:
                self._end(e, notify=False)
                return
            if sent == len(data):
                return
            self._unfinished = bytes(data[sent:])
            self._buffered += len(self._unfinished)
            self._watch_writes()
        else:
            chunk = bytes(data)
            self._backlog.append(chunk)
            self._buffered += len(chunk)
        if self._buffered > self._high and not self._protocol_paused:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _send(self, data: bytes | bytearray | memoryview) -> int:
        """All of ``data`` written, or want-write (Python leaves OpenSSL's partial writes off).  Corked when it
        makes several records, so that the kernel sends them as one segment and not one per 16 KiB record."""
        if len(data) <= RECORD:
            return self._sock.send(data)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            return self._sock.send(data)
        finally:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))  # one TLS record for a frame header and its payload, not two

    def _watch_writes(self) -> None:
        if not self._writing:
            self._loop.add_writer(self._fd, self._write_ready)
            self._writing = True

    def _write_ready(self) -> None:
        while self._unfinished is not None:
            try:
                sent = self._send(self._unfinished)
            except _WANT:
                return
            except (OSError, ssl.SSLError) as e:
                self._end(e, notify=False)
                return
            self._buffered -= sent
            if sent < len(self._unfinished):
                self._unfinished = self._unfinished[sent:]
                continue
            self._unfinished = self._backlog.popleft() if self._backlog else None
        self._loop.remove_writer(self._fd)
        self._writing = False
        if self._read_needs_write:
            self._read_needs_write = False
            self._read_ready()
        if self._lost:
            return
        if self._protocol_paused and self._buffered <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()
        if self._closing:
            self._end(None, notify=True)

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = HIGH_WATER if high is None else high
        self._low = self._high // 4 if low is None else low

    def can_write_eof(self) -> bool:
        return False

    # ending
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; write what is buffered, then ``close_notify``, then close."""
        if self._closing:
            return
        self._closing = True
        self._unwatch_reads()
        if self._unfinished is None:
            self._end(None, notify=True)

    def abort(self) -> None:
        self._end(None, notify=False)

    def _end(self, exc: Exception | None, *, notify: bool) -> None:
        if self._lost:
            return
        self._lost = self._closing = True
        self._unwatch_reads()
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._unfinished, self._backlog, self._buffered = None, deque(), 0
        if notify:  # one try: a peer that does not read gets no close_notify, only the TCP close
            with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                self._sock.unwrap()
        self._sock.close()
        self._loop.call_soon(self._lost_callback, exc)

    def _lost_callback(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            del self._protocol  # the protocol holds this transport: free both now, not at the next GC

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]
