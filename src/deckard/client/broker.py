"""A client of the broker's QVD protocol, for ``deckard connect``, the tests and the benchmarks.

It puts on the wire what QVD's own client does (``reference/qvd.md`` §1, "What QVD's own client puts on the
wire"): one TLS connection verified against the farm CA, ``GET /qvd/list_of_vm?`` then
``GET /qvd/connect_to_vm?id=N&qvd.client.*=…`` with ``Connection: Upgrade`` and ``Upgrade: QVD/1.0`` on the
same connection, any number of ``102 Processing`` + ``X-QVD-VM-Info`` lines, then ``101``, after which the
connection is the desktop's display stream.  The only difference: a ``Host`` header is sent, as HTTP/1.1 asks.

Responses are parsed by hand, head by head, so that no byte after the ``101`` is read ahead: the returned
``StreamReader`` starts exactly at the desktop's first byte.  HTTP errors become Deckard errors carrying the
broker's message (401 ``Unauthenticated``, 403 ``PermissionDenied``, 404 ``NotFound``, 422 ``BadInput``,
503 ``Unavailable``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from deckard.model.errors import (
    BadInput,
    DeckardError,
    NotFound,
    Unavailable,
    error_class_for_status,
)
from deckard.runtime.tls import client_context

DEFAULT_PORT = 8443
USER_AGENT = "Deckard/0.1 (QVD protocol)"
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024

ProgressCallback = Callable[[str], Awaitable[None] | None]


def split_server(server: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` → (host, port); the broker's port is 8443 by default."""
    server = server.strip()
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        port = rest.lstrip(":")
    elif server.count(":") == 1:
        host, port = server.split(":")
    else:
        host, port = server, ""
    if not host:
        raise BadInput(f"no host in server address {server!r}: use HOST:PORT", code="bad_server")
    if port and not port.isdigit():
        raise BadInput(f"bad port in server address {server!r}: use HOST:PORT", code="bad_server")
    return host, int(port) if port else DEFAULT_PORT


def basic_auth(login: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode("ascii")


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace").strip()


def error_for(resp: Response) -> DeckardError:
    cls = error_class_for_status(resp.status)
    message = resp.text or f"the broker answered {resp.status} {resp.reason}"
    err = cls(message, code=f"http_{resp.status}")
    err.details = {"status": resp.status, "error": resp.headers.get("x-deckard-error", "")}
    return err


def resolve_desktop(desktops: list[dict[str, Any]], name_or_id: str | int | None) -> dict[str, Any]:
    """Pick one desktop of a list_of_vm by id or name; may be omitted when the user has exactly one."""
    if name_or_id is None or str(name_or_id) == "":
        if len(desktops) == 1:
            return desktops[0]
        if not desktops:
            raise NotFound("you have no desktop: ask your administrator for one", code="no_desktop")
        names = ", ".join(f"{d['name']} (id {d['id']})" for d in desktops)
        raise BadInput(f"you have several desktops, choose one with --desktop: {names}", code="choose_desktop")
    ref = str(name_or_id)
    for d in desktops:
        if str(d.get("id")) == ref or d.get("name") == ref:
            return d
    names = ", ".join(str(d.get("name")) for d in desktops) or "none"
    raise NotFound(f"you have no desktop {ref!r} (yours: {names})", code="desktop_not_found")


class BrokerConnection:
    """One TLS connection to a broker, used for requests then, optionally, upgraded to a tunnel."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host
        self.upgrade_headers: dict[str, str] = {}  # the 101's (names in lower case): X-QVD-Slave-Key for NX

    @classmethod
    async def open(cls, server: str, ca: Path, *, timeout: float = 15.0) -> BrokerConnection:
        host, port = split_server(server)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=client_context(ca), server_hostname=host, limit=MAX_HEAD * 4),
                timeout,
            )
        except TimeoutError:
            raise Unavailable(
                f"the broker at {host}:{port} did not answer within {timeout:g} s", code="broker_unreachable"
            ) from None
        except OSError as e:
            raise Unavailable(f"cannot reach the broker at {host}:{port}: {e}", code="broker_unreachable") from e
        return cls(reader, writer, host)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def _send(self, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> None:
        # QVD's client always sends the "?", even with an empty query
        lines = [f"GET {path}?{urlencode(query)} HTTP/1.1", f"Host: {self.host}", f"User-Agent: {USER_AGENT}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self.writer.drain()

    async def _read_head(self) -> Response:
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            raise Unavailable("the broker closed the connection", code="broker_closed") from None
        except asyncio.LimitOverrunError:
            raise Unavailable("the broker sent an oversized reply head", code="broker_protocol") from None
        lines = raw.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if version != "HTTP/1.1" or not code.isdigit():
            raise Unavailable(f"the broker sent an invalid status line {lines[0]!r}", code="broker_protocol")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        return Response(int(code), reason, headers)

    async def _read_response(self, on_progress: ProgressCallback | None = None) -> Response:
        """The final response (bodies by Content-Length); 1xx other than 101 are reported and skipped."""
        while True:
            resp = await self._read_head()
            if resp.status == 101 or resp.status >= 200:
                break
            info = resp.headers.get("x-qvd-vm-info")
            if info and on_progress is not None:
                out = on_progress(info)
                if out is not None:
                    await out
        if resp.status != 101:
            length = int(resp.headers.get("content-length", "0") or 0)
            if length > MAX_BODY:
                raise Unavailable("the broker sent an oversized reply", code="broker_protocol")
            try:
                resp.body = await self.reader.readexactly(length)
            except asyncio.IncompleteReadError:
                raise Unavailable("the broker closed the connection mid-reply", code="broker_closed") from None
        return resp

    async def list_desktops(self, login: str, password: str) -> list[dict[str, Any]]:
        await self._send(
            "/qvd/list_of_vm", {}, {"Authorization": basic_auth(login, password), "Accept": "application/json"}
        )
        resp = await self._read_response()
        if resp.status != 200:
            raise error_for(resp)
        try:
            out = json.loads(resp.body)
        except ValueError:
            raise Unavailable("the broker sent a desktop list that is not JSON", code="broker_protocol") from None
        if not isinstance(out, list):
            raise Unavailable("the broker sent a desktop list that is not a list", code="broker_protocol")
        return out

    async def connect(
        self,
        login: str,
        password: str,
        desktop_id: int,
        *,
        on_progress: ProgressCallback | None = None,
        params: Mapping[str, str] | None = None,
        display: str = "vnc",
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Ask for the desktop; after ``101`` this connection is the display stream: VNC, or with
        ``display="nx"`` NX, asked for as QVD's client does (without the ``X-Deckard-Display`` header)."""
        query = {"id": str(desktop_id), **(params or {})}
        headers = {"Authorization": basic_auth(login, password), "Connection": "Upgrade", "Upgrade": "QVD/1.0"}
        if display != "nx":
            headers["X-Deckard-Display"] = display
        await self._send("/qvd/connect_to_vm", query, headers)
        resp = await self._read_response(on_progress)
        if resp.status != 101:
            raise error_for(resp)
        self.upgrade_headers = resp.headers
        return self.reader, self.writer


async def list_desktops(server: str, login: str, password: str, ca: Path) -> list[dict[str, Any]]:
    """The user's desktops: ``[{"id","name","state","blocked",...}]``."""
    conn = await BrokerConnection.open(server, ca)
    try:
        return await conn.list_desktops(login, password)
    finally:
        await conn.close()


async def connect(
    server: str,
    login: str,
    password: str,
    ca: Path,
    desktop_id: int,
    on_progress: ProgressCallback | None = None,
    *,
    params: Mapping[str, str] | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a tunnel to the desktop; the streams carry the display protocol (VNC) from the first byte."""
    conn = await BrokerConnection.open(server, ca)
    try:
        return await conn.connect(login, password, desktop_id, on_progress=on_progress, params=params)
    except BaseException:
        await conn.close()
        raise
