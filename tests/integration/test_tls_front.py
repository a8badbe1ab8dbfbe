"""The broker's TLS transport (``broker/tlsfront.py``) on loopback, under asyncio's loop and uvloop's.

Each test runs a real TLS server (``accept_tls``) and a real client; the server's protocol is a small
``BufferedProtocol`` that records what the transport tells it.  What is checked is asyncio's transport contract
as the broker uses it: every byte arrives, in order, both ways; a client that does not read makes the protocol
pause (the transport's buffer stays bounded by what the protocol wrote) and resume; ``close`` flushes then ends
the stream; ``abort`` ends it at once; ``connection_lost`` comes exactly once; a handshake that does not come
times out; a client that speaks plain HTTP gets a clean close, not a reset.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from deckard.broker.tlsfront import TlsTransport, accept_tls
from deckard.runtime.tls import client_context, ensure_tls, server_context

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


class Recorder(asyncio.BufferedProtocol):
    """Keeps what it receives; optionally echoes it; counts the transport's calls."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.transport: TlsTransport | None = None
        self.received = bytearray()
        self.buf = memoryview(bytearray(65536))
        self.events: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.eof = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TlsTransport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:  # noqa: ARG002
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(self.buf[:nbytes])
        self.received += data
        if self.echo and self.transport is not None:
            self.transport.write(data)

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        self.eof.set()
        return False

    def pause_writing(self) -> None:
        self.events.append("pause")
        if self.transport is not None:
            self.transport.pause_reading()  # as the broker's relay does: stop taking what it cannot pass on

    def resume_writing(self) -> None:
        self.events.append("resume")
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return ensure_tls(tmp_path_factory.mktemp("tls"), ["127.0.0.1"], "ec256")


def run(loop: str, body: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(body(), 60))


async def serve(
    certs: tuple[Path, Path, Path], protocol: Callable[[], Recorder], timeout: float = 10.0
) -> tuple[asyncio.Future[Recorder], int, socket.socket]:
    """A listening socket whose first connection gets ``accept_tls`` (the result: its protocol, or the error)."""
    _ca, cert, key = certs
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    served: asyncio.Future[Recorder] = loop.create_future()

    async def accept() -> None:
        conn, _ = await loop.sock_accept(listener)
        proto = protocol()
        try:
            await accept_tls(conn, server_context(cert, key), proto, timeout)
        except Exception as e:
            served.set_exception(e)
            return
        served.set_result(proto)

    task = loop.create_task(accept())
    served.add_done_callback(lambda _f: task)  # keep the task alive as long as the future
    return served, listener.getsockname()[1], listener


async def client(certs: tuple[Path, Path, Path], port: int, **kw: Any) -> tuple[asyncio.StreamReader, Any]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(certs[0]), server_hostname="127.0.0.1", limit=1 << 22, **kw
    )


@pytest.mark.parametrize("loop", LOOPS)
def test_many_megabytes_both_ways_arrive_whole_and_in_order(certs: Any, loop: str) -> None:
    payload = os.urandom(8 * 1024 * 1024)

    async def body() -> None:
        served, port, listener = await serve(certs, lambda: Recorder(echo=True))
        reader, writer = await client(certs, port)
        proto = await served

        async def send() -> None:
            for i in range(0, len(payload), 100_000):  # odd sizes: records and reads do not line up
                writer.write(payload[i : i + 100_000])
                await writer.drain()

        sender = asyncio.create_task(send())
        echoed = await reader.readexactly(len(payload))
        await sender
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        assert bytes(proto.received) == payload
        writer.close()
        assert await proto.lost is None
        assert proto.events.count("lost") == 1 and "eof" in proto.events
        listener.close()

    run(loop, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_does_not_read_pauses_the_writer_until_it_reads(certs: Any, loop: str) -> None:
    block = bytes(256 * 1024)

    async def body() -> None:
        served, port, listener = await serve(certs, Recorder)
        reader, writer = await client(certs, port)
        proto = await served
        transport = proto.transport
        assert transport is not None
        transport.set_write_buffer_limits(high=512 * 1024)
        sent: list[bytes] = []
        shared = bytearray(len(block))  # one buffer, refilled after each write, as the relay's direct buffer is
        while "pause" not in proto.events:  # the protocol writes until told to stop, as the relay does
            shared[:] = os.urandom(len(block))
            sent.append(bytes(shared))
            with memoryview(shared) as view:
                transport.write(view)  # what the socket does not take now, the transport must copy
            shared.append(0)  # resizable again: the transport kept no view of the writer's buffer (BufferError)
            del shared[-1]
            assert len(sent) < 256, "never paused"
            await asyncio.sleep(0)
        assert transport.get_write_buffer_size() <= 512 * 1024 + len(block)
        written = len(sent) * len(block)
        got = await reader.readexactly(written)  # now the client reads: everything, in order
        assert got == b"".join(sent)
        for _ in range(100):
            if "resume" in proto.events:
                break
            await asyncio.sleep(0.01)
        assert proto.events[:2] == ["pause", "resume"]
        assert transport.get_write_buffer_size() == 0
        writer.close()
        await proto.lost
        listener.close()

    run(loop, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_close_flushes_what_is_buffered_then_ends_the_stream(certs: Any, loop: str) -> None:
    async def body() -> None:
        served, port, listener = await serve(certs, Recorder)
        reader, writer = await client(certs, port)
        proto = await served
        assert proto.transport is not None
        data = os.urandom(3 * 1024 * 1024)  # more than the socket takes at once: close must wait for it
        proto.transport.write(data)
        proto.transport.close()
        assert proto.transport.is_closing()
        proto.transport.write(b"after close")  # dropped, as asyncio's transports do
        assert await reader.readexactly(len(data)) == data
        assert await reader.read() == b""  # close_notify, then the end of the stream
        assert await proto.lost is None
        assert proto.events == ["lost"]
        writer.close()
        listener.close()

    run(loop, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_abort_ends_at_once_and_connection_lost_comes_once(certs: Any, loop: str) -> None:
    async def body() -> None:
        served, port, listener = await serve(certs, Recorder)
        reader, writer = await client(certs, port)
        proto = await served
        assert proto.transport is not None
        proto.transport.pause_reading()
        proto.transport.write(os.urandom(4 * 1024 * 1024))
        proto.transport.abort()
        proto.transport.abort()
        proto.transport.close()
        assert await proto.lost is None
        await asyncio.sleep(0.05)
        assert proto.events == ["pause", "lost"]  # 4 MiB is over the high-water mark; no resume after the end
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            await reader.readexactly(8 * 1024 * 1024)
        writer.close()
        listener.close()

    run(loop, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_never_handshakes_times_out(certs: Any, loop: str) -> None:
    async def body() -> None:
        served, port, listener = await serve(certs, Recorder, timeout=0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # TCP only, silent
        with pytest.raises(TimeoutError):
            await served
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the broker closed its side
        writer.close()
        listener.close()

    run(loop, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_plain_http_gets_a_clean_close_not_a_reset(certs: Any, loop: str) -> None:
    async def body() -> None:
        served, port, listener = await serve(certs, Recorder)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /qvd/ping HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 200 + b"\r\n")
        with pytest.raises(ssl.SSLError):
            await served
        rest = await asyncio.wait_for(reader.read(), 5)  # the TLS alert, if any, then EOF (a reset would raise)
        assert len(rest) < 100
        writer.close()
        listener.close()

    run(loop, body)
