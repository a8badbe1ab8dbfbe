"""Client of the guest agent (deckard-vma) that runs inside every desktop, as the broker and the node call it.

The agent answers ``GET /vma/<method>?params`` on the desktop's IP with a per-desktop bearer token and JSON
replies ``{"ok": true, ...}`` or ``{"ok": false, "error": {"code", "message"}}`` (QVD's VMA SimpleRPC, made
typed).  Every failure becomes :class:`~deckard.model.errors.Unavailable`, because to the caller a desktop
whose agent does not answer or refuses is a desktop that is not available right now:

* ``agent_unreachable``: no TCP connection, a timeout, or a reply that is not the agent's JSON;
* ``agent_error``: the agent answered and said no (bad token, display failed to start, ...).

Each call is one plain HTTP/1.0 exchange on a connection of its own, written here on asyncio streams: the object
stays stateless (nodes build one per ping and never close it), and a call costs ~0.7 ms of the event loop where
an ``httpx.AsyncClient`` per call cost ~3.5 ms — calls a start makes every 10 ms while it waits for a new
agent, and two of a warm pool take-over's critical path.  A reply is at most :data:`MAX_REPLY` bytes.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import urlencode

from deckard.model.errors import Unavailable

AGENT_PORT = 3030  # same value as deckard.drivers.base.AGENT_PORT; the client layer may not import drivers
X_START_CONNECT_S = 10.0  # the connection of the display's start may take longer than other calls' (x_start)
MAX_REPLY = 16 * 1024 * 1024  # the largest RPC reply read (an exec's output is capped lower by the agent)
STATUS_RE = re.compile(rb"HTTP/1\.[01] (\d{3})")


class _NotHttp(Exception):
    """The reply was not an HTTP response (or larger than any the agent sends)."""


class _NoConnection(Exception):
    """The agent's port took no connection in time (a guest gone, or a path to it not yet learned)."""


async def _exchange(ip: str, port: int, request: bytes, connect_timeout: float, limit: float) -> tuple[int, bytes]:
    """Send ``request`` and read the whole reply (the agent closes after it): status and body.  The connection is
    made within ``connect_timeout`` (else :class:`_NoConnection`), all of it within ``limit`` (else TimeoutError)."""
    deadline = asyncio.get_running_loop().time() + limit
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), connect_timeout)
    except TimeoutError:
        raise _NoConnection from None
    reply = bytearray()
    try:
        async with asyncio.timeout_at(deadline):
            writer.write(request)
            while chunk := await reader.read(65536):
                reply += chunk
                if len(reply) > MAX_REPLY:
                    raise _NotHttp
    finally:
        writer.close()
    head, sep, body = bytes(reply).partition(b"\r\n\r\n")
    status = STATUS_RE.match(head)
    if status is None or not sep:
        raise _NotHttp
    return int(status.group(1)), body


class AgentClient:
    """Typed calls to one desktop's agent."""

    def __init__(self, ip: str, token: str, port: int = AGENT_PORT, timeout: float = 4.0) -> None:
        self.ip = ip
        self.port = port
        self.timeout = timeout
        self._token = token

    def __repr__(self) -> str:
        return f"AgentClient({self.ip}:{self.port})"

    async def call(
        self,
        method: str,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
        *,
        connect_timeout: float | None = None,
    ) -> dict[str, Any]:
        """One RPC; returns the reply object (``ok`` is true) or raises Unavailable.  The connection must be made
        within ``connect_timeout`` (the client's timeout unless given), the reply come within ``timeout``."""
        limit = self.timeout if timeout is None else timeout
        connect = min(limit, self.timeout if connect_timeout is None else connect_timeout)
        where = f"{self.ip}:{self.port}"
        query = f"?{urlencode(params)}" if params else ""
        request = (
            f"GET /vma/{method}{query} HTTP/1.0\r\nHost: {where}\r\nAuthorization: Bearer {self._token}\r\n\r\n"
        ).encode()
        try:
            status, raw = await _exchange(self.ip, self.port, request, connect, limit)
        except _NoConnection:
            raise Unavailable(
                f"the desktop agent at {where} took no connection within {connect:g} s ({method})",
                code="agent_unreachable",
            ) from None
        except TimeoutError:
            raise Unavailable(
                f"the desktop agent at {where} did not answer {method} within {limit:g} s",
                code="agent_unreachable",
            ) from None
        except (OSError, _NotHttp) as e:
            why = "not an HTTP reply" if isinstance(e, _NotHttp) else (e.strerror or type(e).__name__)
            raise Unavailable(
                f"cannot reach the desktop agent at {where} ({method}): {why}", code="agent_unreachable"
            ) from None
        try:
            body = json.loads(raw)
        except ValueError:
            raise Unavailable(
                f"the desktop agent at {where} answered {method} with something that is not JSON (HTTP {status})",
                code="agent_unreachable",
            ) from None
        if not isinstance(body, dict):
            raise Unavailable(
                f"the desktop agent at {where} sent an unexpected reply to {method}", code="agent_unreachable"
            )
        if not body.get("ok") or status >= 400:
            raw_err = body.get("error")
            err: dict[str, Any] = raw_err if isinstance(raw_err, dict) else {}
            message = str(err.get("message") or f"HTTP {status}")
            code = str(err.get("code") or "error")
            raise Unavailable(
                f"the desktop agent refused {method}: {message} ({code})",
                code="agent_error",
                details={"agent_code": code, "http_status": status},
            )
        return body

    async def exec(self, command: str, *, user: str = "", timeout: float = 10.0) -> dict[str, Any]:
        """Run a shell command in the guest (as root, or as ``user``): ``{"returncode", "stdout", "stderr"}``."""
        params = {"command": command, "timeout": str(timeout), **({"user": user} if user else {})}
        return await self.call("exec", params, timeout=timeout + 5)

    async def ping(self) -> dict[str, Any]:
        """``{"ok", "version", "x_state"}``: the agent is alive."""
        return await self.call("ping")

    async def x_state(self) -> str:
        """The display's state: stopped|starting|provisioning|listening|connected|suspending|suspended|stopping."""
        return str((await self.call("x_state")).get("state", "unknown"))

    async def x_start(
        self,
        user: str,
        uid: int,
        geometry: str | None = None,
        timeout: float = 15,
        keyboard: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Provision ``user`` and start the display; returns once it accepts connections.  ``keyboard`` is the
        client's XKB layout (``us``, ``de``, ``fr(azerty)``), applied by the session when the display starts;
        ``extra`` carries an NX session's ``protocol=nx`` and options (``broker/nx.py``)."""
        params = {"user": user, "uid": str(uid), **(extra or {})}
        if geometry:
            params["geometry"] = geometry
        if keyboard:
            params["keyboard"] = keyboard
        # the first call to a desktop that has just started on another machine may go out before the overlay
        # has learned where it now lives: the kernel's SYN retries (1, 3, 7 s) get through once it has
        return await self.call("x_start", params, timeout=timeout, connect_timeout=X_START_CONNECT_S)

    async def spy_notice(self, admin: str, interactive: bool = False) -> dict[str, Any]:
        """Tell the desktop's user that an administrator is watching (a banner on their display)."""
        return await self.call("spy_notice", {"admin": admin, "interactive": "1" if interactive else "0"})

    async def input_idle_ms(self) -> int | None:
        """Milliseconds since the user's last keyboard or mouse input; None when the agent cannot tell (no display,
        or an older agent without the ``idle`` method)."""
        try:
            idle = (await self.call("idle")).get("idle_ms")
        except Unavailable as e:
            if e.details.get("agent_code") == "unknown_method":
                return None
            raise
        return idle if isinstance(idle, int) and not isinstance(idle, bool) and idle >= 0 else None

    async def session_notice(self, reason: str, action: str, in_s: int) -> dict[str, Any]:
        """Tell the user on their display that a session policy will ``action`` (stop|disconnect) in ``in_s``
        seconds because of ``reason`` (idle|max_length)."""
        return await self.call("session_notice", {"reason": reason, "action": action, "in_s": str(max(0, in_s))})

    async def take_over(self, user: str, uid: int, ip: str, timeout: float = 15) -> dict[str, Any]:
        """A warm guest becomes ``user``'s desktop at ``ip``: their account and session on its display."""
        return await self.call("take_over", {"user": user, "uid": str(uid), "ip": ip}, timeout=timeout)

    async def x_stop(self) -> dict[str, Any]:
        return await self.call("x_stop")

    async def poweroff(self) -> dict[str, Any]:
        return await self.call("poweroff")

    async def expire(self) -> dict[str, Any]:
        return await self.call("expire")
