"""The agent client's HTTP exchange against a server on loopback: replies, refusals and what is not the agent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from deckard.client import agent as agent_client
from deckard.client.agent import AgentClient
from deckard.model.errors import Unavailable

Reply = Callable[[], bytes]  # b"": answer nothing (a hung agent)


def _http(status: int, body: bytes) -> bytes:
    head = f"HTTP/1.0 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class Agent:
    """A stand-in agent on loopback: records each request's head, answers with the next reply, closes."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.replies: list[Reply] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.heads.append(await reader.readuntil(b"\r\n\r\n"))
        out = self.replies.pop(0)()
        if out:
            writer.write(out)
            await writer.drain()
        else:
            await asyncio.sleep(5)
        writer.close()

    def client(self, timeout: float = 1.0) -> AgentClient:
        assert self.server is not None
        return AgentClient("127.0.0.1", "tok3n", port=int(self.server.sockets[0].getsockname()[1]), timeout=timeout)


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    a = Agent()
    a.server = await asyncio.start_server(a.handle, "127.0.0.1", 0)
    yield a
    a.server.close()


async def test_a_call_sends_the_token_and_the_parameters_and_returns_the_reply(agent: Agent) -> None:
    agent.replies.append(lambda: _http(200, json.dumps({"ok": True, "state": "listening"}).encode()))
    reply = await agent.client().call("x_start", {"user": "ann", "keyboard": "fr(azerty)"})
    assert reply == {"ok": True, "state": "listening"}
    head = agent.heads[0].decode()
    assert head.startswith("GET /vma/x_start?user=ann&keyboard=fr%28azerty%29 HTTP/1.0\r\n")
    assert "\r\nAuthorization: Bearer tok3n\r\n" in head


async def test_a_refusal_keeps_the_agents_code_and_status(agent: Agent) -> None:
    body = {"ok": False, "error": {"code": "display_busy", "message": "in use"}}
    agent.replies.append(lambda: _http(409, json.dumps(body).encode()))
    with pytest.raises(Unavailable) as e:
        await agent.client().call("x_start")
    assert e.value.code == "agent_error"
    assert e.value.details == {"agent_code": "display_busy", "http_status": 409}
    assert "in use" in e.value.message


@pytest.mark.parametrize(
    "reply",
    [
        lambda: _http(200, b"<html>a proxy</html>"),  # not JSON
        lambda: _http(200, b"[1, 2]"),  # JSON, not the agent's object
        lambda: b"SSH-2.0-OpenSSH_9.2\r\n",  # not HTTP (the connection closes without a blank line)
    ],
)
async def test_what_is_not_the_agents_reply_is_unreachable(agent: Agent, reply: Reply) -> None:
    agent.replies.append(reply)
    with pytest.raises(Unavailable) as e:
        await agent.client().call("ping")
    assert e.value.code == "agent_unreachable"


async def test_a_reply_larger_than_any_the_agent_sends_is_not_read_to_the_end(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_client, "MAX_REPLY", 1000)
    agent.replies.append(lambda: _http(200, b'{"ok": true, "x": "' + b"a" * 5000 + b'"}'))
    with pytest.raises(Unavailable) as e:
        await agent.client().call("ping")
    assert e.value.code == "agent_unreachable"


async def test_a_silent_agent_times_out_and_a_closed_port_is_refused(agent: Agent) -> None:
    agent.replies.append(lambda: b"")
    with pytest.raises(Unavailable) as e:
        await agent.client(timeout=0.3).call("ping")
    assert e.value.code == "agent_unreachable" and "within 0.3 s" in e.value.message
    assert agent.server is not None
    port = int(agent.server.sockets[0].getsockname()[1])
    agent.server.close()
    await agent.server.wait_closed()
    with pytest.raises(Unavailable) as e:
        await AgentClient("127.0.0.1", "t", port=port).call("ping")
    assert e.value.code == "agent_unreachable" and "cannot reach" in e.value.message


async def test_a_connection_not_taken_is_told_apart_and_the_displays_start_waits_longer_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SYN that goes nowhere (a desktop moved to a machine the overlay has not learned yet): an ordinary call
    gives up after the client's timeout and says it was the connection; ``x_start`` waits up to
    ``X_START_CONNECT_S`` for it, the kernel's retries meanwhile."""
    waited: list[float] = []

    async def never(*_address: object) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        await asyncio.sleep(3600)
        raise AssertionError

    async def timed(aw: object, timeout: float) -> object:
        waited.append(timeout)
        return await real_wait_for(aw, 0.05)  # type: ignore[arg-type]

    real_wait_for = asyncio.wait_for
    monkeypatch.setattr(agent_client.asyncio, "open_connection", never)
    monkeypatch.setattr(agent_client.asyncio, "wait_for", timed)
    client = AgentClient("192.0.2.1", "t", timeout=4.0)
    with pytest.raises(Unavailable) as e:
        await client.ping()
    assert e.value.code == "agent_unreachable" and "took no connection within 4 s (ping)" in e.value.message
    with pytest.raises(Unavailable) as e:
        await client.x_start("ann", 2001, timeout=35)
    assert f"took no connection within {agent_client.X_START_CONNECT_S:g} s (x_start)" in e.value.message
    assert waited == [4.0, agent_client.X_START_CONNECT_S]
