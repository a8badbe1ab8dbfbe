"""File transfer with a desktop's guest agent (``/files/*`` on its RPC port), as the broker's file panel uses it.

The agent checks every path (relative to the user's home, never out of it) and does the I/O with the user's
uid; this side only streams: an upload's body goes out as it arrives from the browser, a download's bytes
come back chunk by chunk, so neither sits in the broker's memory.  Every refusal keeps the agent's stable code
(``bad_path``, ``outside_home``, ``not_found``, ``not_a_file``, ``too_large``, ``disk_full``, ``no_user``);
a desktop that cannot be reached is ``agent_unreachable``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import unquote, urlencode

import h11
import httpx

from deckard.client.agent import AGENT_PORT

_READ = 64 * 1024  # a download's read buffer: under the broker's fixed 128 KiB mmap threshold
_QUEUED = 1024 * 1024  # a download's bytes read ahead of the browser, at most (then the agent waits)


class AgentFileError(Exception):
    """The agent refused a file operation, or could not be reached: ``code`` is stable, ``message`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def refusal(status: int, body: bytes, error: type[AgentFileError] = AgentFileError) -> AgentFileError:
    """The agent's JSON refusal ``{"error": {"code", "message"}}`` as ``error``, whatever the body holds."""
    try:
        err = json.loads(body).get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    if not isinstance(err, dict):
        err = {}
    code = str(err.get("code") or "agent_error")
    return error(code, str(err.get("message") or f"the desktop refused (HTTP {status})"))


def agent_http(base_url: str, timeout: float) -> httpx.AsyncClient:
    """An HTTP client for an agent's plain-HTTP routes (files, sound)."""
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout),
        trust_env=False,  # never through a proxy from the environment
        verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),  # plain HTTP: a bare context instead of the CA bundle
    )


def unreachable(e: Exception, error: type[AgentFileError] = AgentFileError) -> AgentFileError:
    """``agent_unreachable`` as ``error``: the desktop did not answer, or broke off."""
    return error("agent_unreachable", f"the desktop did not answer ({e or type(e).__name__}): try again")


class AgentFiles:
    """The file routes of one desktop's agent, for the files of ``login`` (the desktop's user)."""

    def __init__(self, ip: str, token: str, login: str, port: int = AGENT_PORT, timeout: float = 10.0) -> None:
        self._base = f"http://{ip}:{port}"
        self._ip, self._port, self._host = ip, port, f"{ip}:{port}"
        self._headers = {"Authorization": f"Bearer {token}"}
        self.login = login
        self.timeout = timeout

    def _client(self) -> httpx.AsyncClient:
        return agent_http(self._base, self.timeout)

    async def list(self, directory: str) -> dict[str, Any]:
        """``{"dir", "entries": [{"name", "type", "size", "mtime"}], "truncated"}`` of a folder of the home."""
        try:
            async with self._client() as http:
                resp = await http.get(
                    "/files/list", params={"login": self.login, "dir": directory}, headers=self._headers
                )
        except httpx.HTTPError as e:
            raise unreachable(e) from None
        if resp.status_code != 200:
            raise refusal(resp.status_code, resp.content)
        body: dict[str, Any] = resp.json()
        return {k: body[k] for k in ("dir", "entries", "truncated") if k in body}

    async def upload(self, path: str, size: int, body: AsyncIterator[bytes], max_bytes: int) -> dict[str, Any]:
        """Write ``size`` bytes from ``body`` to ``path`` (the agent picks a free name); ``{"path", "size"}``.
        An exception raised by ``body`` (the browser went away, a cancel) ends the request short: the agent
        then keeps nothing."""
        params = {"login": self.login, "path": path}
        headers = {"Content-Length": str(size), "X-Deckard-Max-Bytes": str(max_bytes)}
        async with self._exchange("PUT", "/files/put", params, headers) as exchange:
            async for chunk in body:
                if not await exchange.send(chunk):  # answered before the end: a refusal (or the agent is gone)
                    break
            status, _ = await exchange.head()
            answer = await exchange.read_all()
        if status != 200:
            raise refusal(status, answer)
        try:
            reply = json.loads(answer)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise unreachable(ValueError("the agent's answer is not a JSON object"))
        return {"path": reply.get("path", path), "size": reply.get("size", size)}

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[tuple[str, int, AsyncIterator[bytes]]]:
        """``(name, size, chunks)`` of a file of the home, streamed as the agent sends it."""
        async with self._exchange("GET", "/files/get", {"login": self.login, "path": path}) as exchange:
            status, headers = await exchange.head()
            if status != 200:
                raise refusal(status, await exchange.read_all())
            name = unquote(headers.get(b"x-deckard-file-name", b"").decode()) or path.rsplit("/", 1)[-1]
            yield name, exchange.size, exchange.chunks()

    @asynccontextmanager
    async def _exchange(
        self, method: str, route: str, params: dict[str, str], headers: dict[str, str] | None = None
    ) -> AsyncIterator[_Exchange]:
        """One request to the agent on a connection of its own (see ``_Exchange``), closed on the way out."""
        request = h11.Request(
            method=method,
            target=f"{route}?{urlencode(params)}",
            headers=[("Host", self._host), ("Connection", "close"), *self._headers.items(), *(headers or {}).items()],
        )
        loop = asyncio.get_running_loop()
        try:
            transport, exchange = await asyncio.wait_for(
                loop.create_connection(lambda: _Exchange(request, self.timeout), self._ip, self._port), self.timeout
            )
        except (OSError, TimeoutError) as e:
            raise unreachable(e) from None
        try:
            yield exchange
        finally:
            transport.abort()


class _Exchange(asyncio.BufferedProtocol):
    """One HTTP/1.1 request to the agent and its answer: the request body written as it comes (``send`` waits
    while the agent is behind), the answer read into one 64 KiB buffer, its head parsed by h11 and its body handed
    on in the pieces it arrives in, at most ``_QUEUED`` bytes ahead of the reader.

    Why not httpx, as the listing: a download went through uvloop's read copy, anyio's slicing and h11's receive
    buffer (four copies and an mmap per piece), an upload through h11 and anyio per write; the broker spent more on
    them than on TLS, and transfers reached half of what the broker relays for a display.  Here a downloaded piece
    is copied once, and an uploaded one goes to the socket as the browser's frame was unmasked."""

    def __init__(self, request: h11.Request, timeout: float) -> None:
        self.timeout = timeout
        self._h11 = h11.Connection(h11.CLIENT)
        self._request = self._h11.send(request) or b""
        self.size = -1  # the body's length, once the head is read
        self._buf = memoryview(bytearray(_READ))
        self._head = bytearray()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._left = 0
        self._ended: Exception | None = None  # what ended the stream (EOF included); None while it runs
        self._wake = asyncio.Event()
        self.transport: asyncio.Transport | None = None
        self._response: h11.Response | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    # -- asyncio callbacks ---------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def get_buffer(self, sizehint: int) -> memoryview:  # noqa: ARG002  (the buffer has one size)
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._received(bytes(self._buf[:nbytes]))
        except h11.ProtocolError as e:
            self._end(e)

    def _received(self, data: bytes) -> None:
        if self._response is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > _READ:
                    self._end(h11.RemoteProtocolError("the agent's response head is too long"))
                return
            self._h11.receive_data(bytes(self._head[: end + 4]))
            event = self._h11.next_event()
            if not isinstance(event, h11.Response):
                self._end(h11.RemoteProtocolError(f"the agent answered {type(event).__name__}, not a response"))
                return
            self._response = event
            length = dict(event.headers).get(b"content-length", b"")
            self.size = self._left = int(length) if length.isdigit() else -1
            if self.size < 0:
                self._end(h11.RemoteProtocolError("the agent's answer has no Content-Length"))
                return
            data = bytes(self._head[end + 4 :])
            self._head = bytearray()
        if len(data) > self._left:
            self._end(h11.RemoteProtocolError("the agent sent more than its Content-Length"))
            return
        if data:
            self._left -= len(data)
            self._chunks.append(data)
            self._queued += len(data)
            if self._queued > _QUEUED and self.transport is not None:
                self.transport.pause_reading()
        self._wake.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def eof_received(self) -> bool | None:
        self._end(ConnectionResetError(f"the agent closed the connection with {self._left} bytes to come"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or ConnectionResetError("the agent closed the connection"))

    def _end(self, exc: Exception) -> None:
        if self._ended is None:
            self._ended = exc
        self._wake.set()
        self._writable.set()
        if self.transport is not None:
            # abort, not close: the agent has ended, so what is left of the request body is dropped.  A close with
            # data still buffered could also end the transport later without counting it lost, and the caller's
            # abort() then found no event loop on it (CPython 3.11's _write_ready): an AttributeError in CI
            self.transport.abort()

    # -- the caller's side ---------------------------------------------------------------------------------------
    async def send(self, data: bytes) -> bool:
        """Part of the request body, waiting while the agent's socket is full; False, sending nothing, once the
        agent has begun to answer or the connection ended (``head`` then says which)."""
        if self._head or self._response or self._ended or self.transport is None:
            return False
        self.transport.write(data)
        if not self._writable.is_set():
            try:
                await asyncio.wait_for(self._writable.wait(), self.timeout)
            except TimeoutError:
                raise unreachable(TimeoutError(f"the agent took nothing for {self.timeout:.0f} s")) from None
        return True

    async def _wait(self) -> None:
        """Until the agent sends more or the stream ends; a dead stream is ``agent_unreachable``."""
        if self._ended is not None:
            raise unreachable(self._ended)
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), self.timeout)
        except TimeoutError:
            raise unreachable(TimeoutError(f"the agent sent nothing for {self.timeout:.0f} s")) from None

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        while self._response is None:
            await self._wait()
        return self._response.status_code, dict(self._response.headers)

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self._queued -= len(data)
                if self._queued <= _QUEUED // 2 and self.transport is not None:
                    self.transport.resume_reading()
                yield data
            elif not self._left:
                return
            else:
                await self._wait()

    async def read_all(self) -> bytes:
        """The whole (small: a refusal) body; at most ``_READ`` bytes of it."""
        out = bytearray()
        async for chunk in self.chunks():
            out += chunk[: _READ - len(out)]
        return bytes(out)
