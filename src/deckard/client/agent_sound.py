"""A desktop's sound from its guest agent (``GET /sound?login=`` on its RPC port), as the broker's sound channel
reads it.

The body (``vma/sound.py`` has the reasons): one JSON header line, then records of ``length`` (u16, big-endian),
``ts_us`` (u64, big-endian, CLOCK_REALTIME in microseconds) and an Opus packet of that length.
:class:`SoundRecords` takes them apart as bytes arrive and holds at most one record; a refusal keeps the agent's
stable code (``no_sound``, ``no_user``), a desktop that cannot be reached is ``agent_unreachable``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from deckard.client.agent import AGENT_PORT
from deckard.client.agent_files import AgentFileError, agent_http, refusal, unreachable

RECORD = struct.Struct(">HQ")
MAX_PACKET = 4000  # the agent's own limit (an Opus packet of one 20 ms frame is at most 1275 bytes)
MAX_HEADER = 4096


class AgentSoundError(AgentFileError):
    """The agent refused the sound stream, could not be reached, or sent something that is not one."""


class SoundRecords:
    """The body after its header line, fed as it arrives → ``(ts_us, packet)`` pairs."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.header: dict[str, Any] | None = None

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        if self.header is None:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_HEADER:
                    raise AgentSoundError("bad_sound_stream", "the desktop's sound stream has no header")
                return []
            try:
                header = json.loads(bytes(buf[:end]))
            except ValueError:
                header = None
            if not isinstance(header, dict):
                raise AgentSoundError("bad_sound_stream", "the desktop's sound stream has a bad header")
            self.header = header
            del buf[: end + 1]
        out: list[tuple[int, bytes]] = []
        pos = 0
        while len(buf) - pos >= RECORD.size:
            length, ts = RECORD.unpack_from(buf, pos)
            if not 0 < length <= MAX_PACKET:
                raise AgentSoundError("bad_sound_stream", f"the desktop sent a sound packet of {length} bytes")
            end = pos + RECORD.size + length
            if len(buf) < end:
                break
            out.append((ts, bytes(buf[pos + RECORD.size : end])))
            pos = end
        del buf[:pos]
        return out


class AgentSound:
    """The sound route of one desktop's agent, for ``login`` (the desktop's user)."""

    def __init__(self, ip: str, token: str, login: str, port: int = AGENT_PORT, timeout: float = 15.0) -> None:
        self._base = f"http://{ip}:{port}"
        self._headers = {"Authorization": f"Bearer {token}"}
        self.login = login
        self.timeout = timeout

    @asynccontextmanager
    async def stream(self) -> AsyncIterator[tuple[dict[str, Any], AsyncIterator[list[tuple[int, bytes]]]]]:
        """``(header, batches)``: the stream's header and its ``(ts_us, packet)`` pairs as they come, in batches
        of what arrived together.  The agent ends its capture when this context is left."""
        # the read timeout bounds a silence of the agent: it sends a packet every 20 ms, even of silence
        client = agent_http(self._base, self.timeout)
        try:
            async with client:
                params = {"login": self.login}
                async with client.stream("GET", "/sound", params=params, headers=self._headers) as resp:
                    if resp.status_code != 200:
                        raise refusal(resp.status_code, await resp.aread(), AgentSoundError)
                    records = SoundRecords()
                    chunks = resp.aiter_raw()
                    first: list[tuple[int, bytes]] = []
                    async for chunk in chunks:
                        first = records.feed(chunk)
                        if records.header is not None:
                            break
                    if records.header is None:
                        raise AgentSoundError("no_sound", "the desktop's sound stream ended before it began")

                    async def batches() -> AsyncIterator[list[tuple[int, bytes]]]:
                        if first:
                            yield first
                        async for chunk in chunks:
                            batch = records.feed(chunk)
                            if batch:
                                yield batch

                    yield records.header, batches()
        except httpx.HTTPError as e:
            raise unreachable(e, AgentSoundError) from None
