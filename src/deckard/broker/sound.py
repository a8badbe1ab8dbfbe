"""The desktop's sound in the portal: ``/ws/sound?id=N&ticket=T``, a WebSocket that carries Opus packets one way.

Who may listen: the desktop's owner only, with a one-time ticket of kind ``sound`` (``POST /portal/desktops/{id}/
ticket {"purpose": "sound"}``, refused where ``portal.sound.enabled`` is off); a ticket of another kind, a
replayed one or one for another desktop is refused before the upgrade, as for the display.  An administrator
watching (spy) gets no sound ticket, so hears nothing.

Protocol (server → browser; what the browser sends is read for pings and the close only):

* first a text message: ``{"ready": {"codec": "opus", "rate": 48000, "channels": 2, "frame_ms": 20, ...}}`` (the
  agent's header), or ``{"error": {"code": "no_sound", "message": ...}}`` then a close, when the desktop has no
  sound (an image without an audio server) or its agent cannot give it;
* then one binary message per Opus packet: ``ts_us`` (u64, big-endian: when the desktop captured it, CLOCK_REALTIME
  in microseconds) followed by the packet.

Why packets are dropped, oldest first: late sound is worse than a gap.  The broker reads the agent as fast as it
sends (so neither the agent nor the desktop's encoder ever wait), writes to the browser while its socket's send
buffer holds less than :data:`SEND_BUFFER`, and keeps at most :data:`QUEUE_PACKETS` packets (about half a second)
waiting behind it: a browser that cannot keep up loses the oldest, and the broker's memory for a channel stays
under ``SEND_BUFFER + QUEUE_PACKETS * 1.3 kB`` whatever the browser does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import struct
from typing import Any

import structlog

from deckard.broker.frames import (
    CLOSE_ERROR,
    CLOSE_NORMAL,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameError,
    FrameReader,
    close_payload,
    frame_header,
)
from deckard.broker.http import FrontConnection, HttpChannel
from deckard.broker.peripheral import grant
from deckard.broker.websocket import send_text
from deckard.client.agent_sound import AgentSound, AgentSoundError
from deckard.db.engine import Database
from deckard.services.tickets import SOUND

log = structlog.get_logger("deckard.broker")

SOUND_PATH = "/ws/sound"
SEND_BUFFER = 16 * 1024  # bytes in the socket's send buffer before packets wait in the queue (~1 s at 128 kbit/s)
QUEUE_PACKETS = 25  # packets (20 ms each) waiting behind it, at most: half a second; older ones are dropped
FLUSH_EVERY = 0.01  # seconds between two looks at a socket that was full, while packets wait
TS = struct.Struct(">Q")


class SoundSession:
    """One sound channel after the ``101``: agent packets in, binary messages out, the browser's frames read."""

    def __init__(self, front: FrontConnection, leftover: bytes) -> None:
        self.front = front
        self.reader = FrameReader(125, messages=False)
        self._leftover = leftover
        self.queue: collections.deque[bytes] = collections.deque(maxlen=QUEUE_PACKETS)
        self.packets = self.dropped = self.bytes_out = 0
        self._closed = False
        self._flusher: asyncio.Task[None] | None = None

    def close(self, code: int, reason: str) -> None:
        if not self._closed:
            self._closed = True
            payload = close_payload(code, reason)
            self.front.write(frame_header(OP_CLOSE, len(payload)) + payload)
            self.front.close()

    def _buffered(self) -> int:
        transport = self.front.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def offer(self, ts_us: int, packet: bytes) -> None:
        """A packet from the desktop: sent now if the browser keeps up, else queued (the oldest dropped)."""
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append(TS.pack(ts_us) + packet)
        self.flush()
        if self.queue and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.ensure_future(self._flush_later())

    async def _flush_later(self) -> None:
        """Packets wait behind a full socket: send them as it drains, not only when the next one comes."""
        while self.queue and not self.front.gone:
            await asyncio.sleep(FLUSH_EVERY)
            self.flush()

    def flush(self) -> None:
        while self.queue and self._buffered() < SEND_BUFFER and not self.front.gone:
            message = self.queue.popleft()
            transport = self.front.transport
            assert transport is not None
            transport.writelines((frame_header(OP_BINARY, len(message)), message))
            self.packets += 1
            self.bytes_out += len(message)

    async def pump(self, batches: Any) -> None:
        """The agent's packets to the browser until the agent's stream ends."""
        async for batch in batches:
            if self.front.gone:
                return
            for ts, packet in batch:
                self.offer(ts, packet)

    async def listen(self) -> None:
        """The browser's frames: pings answered, a close (or the connection's end) ends the channel."""
        data = self._leftover
        while True:
            if data:
                try:
                    events = self.reader.feed(data)
                except FrameError as e:
                    self.close(e.code, e.reason)
                    return
                for event in events:
                    if isinstance(event, tuple):
                        opcode, payload = event
                        if opcode == OP_PING:
                            self.front.write(frame_header(OP_PONG, len(payload)) + payload)
                        elif opcode == OP_CLOSE:
                            self.close(CLOSE_NORMAL, "bye")
                            return
            try:
                data = await self.front.receive(3600.0)
            except TimeoutError:
                data = b""
                continue
            if not data:
                return

    async def run(self, agent: AgentSound) -> str:
        """Header, then packets until the agent or the browser ends; returns why it ended."""
        try:
            async with agent.stream() as (header, batches):
                send_text(self.front, {"ready": header})
                pump = asyncio.ensure_future(self.pump(batches))
                listen = asyncio.ensure_future(self.listen())
                done, pending = await asyncio.wait({pump, listen}, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                for task in pending:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                for task in done:
                    task.result()  # an agent's error surfaces here
                reason = "browser" if listen in done else "desktop"
        except AgentSoundError as e:
            self._stop_flusher()
            if self.packets == 0 and not self.front.gone:
                send_text(self.front, {"error": {"code": e.code, "message": e.message}})
            self.close(CLOSE_NORMAL if e.code == "no_sound" else CLOSE_ERROR, e.message)
            return e.code
        self._stop_flusher()
        self.close(CLOSE_NORMAL, "the desktop's sound ended")
        return reason

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()


class SoundConnect:
    """Serves ``/ws/sound``: ticket → the desktop's switch → ``101`` → :class:`SoundSession`."""

    def __init__(self, db: Database, agent_port: int) -> None:
        self.db = db
        self.agent_port = agent_port

    async def serve(self, channel: HttpChannel, req: Any) -> None:
        front = channel.front
        granted = await grant(self.db, channel, req, SOUND)
        if granted is None:
            return
        front.write(granted.response)
        session = SoundSession(front, channel.leave())
        agent = AgentSound(granted.ip, granted.agent_token, granted.login, port=self.agent_port)
        bound = log.bind(desktop_id=granted.desk.id, login=granted.login, peer=front.peer)
        bound.info("broker.sound", result="open")
        try:
            ended = await session.run(agent)
        except Exception:
            bound.exception("broker.sound_crashed")
            session.close(CLOSE_ERROR, "internal error in the broker")
            ended = "crashed"
        bound.info(
            "broker.sound",
            result="closed",
            ended=ended,
            packets=session.packets,
            dropped=session.dropped,
            bytes_out=session.bytes_out,
        )
