"""File transfer with a desktop's guest agent (``/files/*`` on its RPC port), as the broker's file panel uses it.

The agent checks every path (relative to the user's home, never out of it) and does the I/O with the user's
uid; this side only streams: an upload's body goes out as it arrives from the browser, a download's bytes
come back chunk by chunk, so neither sits in the broker's memory.  Every refusal keeps the agent's stable code
(``bad_path``, ``outside_home``, ``not_found``, ``not_a_file``, ``too_large``, ``disk_full``, ``no_user``);
a desktop that cannot be reached is ``agent_unreachable``.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote

import httpx

from deckard.client.agent import AGENT_PORT

CHUNK = 256 * 1024


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


class AgentFiles:
    """The file routes of one desktop's agent, for the files of ``login`` (the desktop's user)."""

    def __init__(self, ip: str, token: str, login: str, port: int = AGENT_PORT, timeout: float = 10.0) -> None:
        self._base = f"http://{ip}:{port}"
        self._headers = {"Authorization": f"Bearer {token}"}
        self.login = login
        self.timeout = timeout

    def _client(self) -> httpx.AsyncClient:
        return agent_http(self._base, self.timeout)

    def _unreachable(self, e: Exception) -> AgentFileError:
        return AgentFileError("agent_unreachable", f"the desktop did not answer ({e or type(e).__name__}): try again")

    async def list(self, directory: str) -> dict[str, Any]:
        """``{"dir", "entries": [{"name", "type", "size", "mtime"}], "truncated"}`` of a folder of the home."""
        try:
            async with self._client() as http:
                resp = await http.get(
                    "/files/list", params={"login": self.login, "dir": directory}, headers=self._headers
                )
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        if resp.status_code != 200:
            raise refusal(resp.status_code, resp.content)
        body: dict[str, Any] = resp.json()
        return {k: body[k] for k in ("dir", "entries", "truncated") if k in body}

    async def upload(self, path: str, size: int, body: AsyncIterator[bytes], max_bytes: int) -> dict[str, Any]:
        """Write ``size`` bytes from ``body`` to ``path`` (the agent picks a free name); ``{"path", "size"}``.
        An exception raised by ``body`` (the browser went away, a cancel) ends the request short: the agent
        then keeps nothing."""
        headers = {**self._headers, "Content-Length": str(size), "X-Deckard-Max-Bytes": str(max_bytes)}
        try:
            async with self._client() as http:
                resp = await http.put(
                    "/files/put", params={"login": self.login, "path": path}, headers=headers, content=body
                )
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        if resp.status_code != 200:
            raise refusal(resp.status_code, resp.content)
        reply: dict[str, Any] = resp.json()
        return {"path": reply.get("path", path), "size": reply.get("size", size)}

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[tuple[str, int, AsyncIterator[bytes]]]:
        """``(name, size, chunks)`` of a file of the home, streamed."""
        try:
            async with self._client() as http:
                params = {"login": self.login, "path": path}
                async with http.stream("GET", "/files/get", params=params, headers=self._headers) as resp:
                    if resp.status_code != 200:
                        raise refusal(resp.status_code, await resp.aread())
                    name = unquote(resp.headers.get("X-Deckard-File-Name", "")) or path.rsplit("/", 1)[-1]
                    yield name, int(resp.headers.get("Content-Length", "0")), resp.aiter_raw(CHUNK)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
