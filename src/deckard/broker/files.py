"""The portal's file panel: ``/ws/files?id=N&ticket=T``, a WebSocket of typed messages to one running desktop.

Why a WebSocket and not HTTP routes: the page reaches the broker on another origin, where a WebSocket needs no
CORS preflight and is already in the page's Content-Security-Policy; one ticket opens a channel for many
operations; and uploads get real back-pressure (the broker reads the browser's frames only as fast as the
desktop takes the bytes).

Protocol (text frames are JSON; one operation at a time):

* server first: ``{"ready": {"max_upload_bytes": N, "files": bool, "printing": bool, "print_dir": "PDF"}}``
  (with files off and printing on, only ``list`` of ``PDF`` and ``download`` of ``PDF/<job>.pdf`` are served);
* ``{"op": "list", "dir": "Downloads"}`` → ``{"op": "list", "dir", "entries", "truncated"}``;
* ``{"op": "upload", "name": "a.txt", "size": N}`` → ``{"op": "upload", "accepted": true}``, then the client
  sends N bytes as binary frames; ``{"op": "upload", "progress": n}`` a few times a second, then
  ``{"op": "upload", "done": {"path": "Uploads/a (1).txt", "size": N}}``.  Files land in ``~/Uploads``;
* ``{"op": "download", "path": "Downloads/x.pdf"}`` → ``{"op": "download", "file": {"name", "size"}}``,
  binary frames, then ``{"op": "download", "done": {"size": N}}``;
* ``{"op": "cancel"}`` ends the running transfer (its error, code ``cancelled``);
* a failure: ``{"op": ..., "error": {"code", "message"}}``.  Binary frames outside an upload (the rest of a
  failed one the browser had already queued) are dropped.

The agent does every path check and the I/O as the user (``client/agent_files.py``); the broker adds the
ticket, the tenant's switch and size limit, and the framing.  Nothing is buffered beyond a chunk.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog

from deckard.broker.frames import (
    CLOSE_ERROR,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL,
    MSG_BEGIN,
    MSG_END,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameReader,
    close_payload,
    frame_header,
)
from deckard.broker.http import FrontConnection, HttpChannel
from deckard.broker.peripheral import grant
from deckard.broker.websocket import send_text
from deckard.client.agent_files import AgentFileError, AgentFiles
from deckard.db.engine import Database
from deckard.runtime.settings import BrokerSettings
from deckard.services.peripherals import PRINT_DIR, Peripherals
from deckard.services.tickets import FILES

log = structlog.get_logger("deckard.broker")

FILES_PATH = "/ws/files"
UPLOADS = "Uploads"
IDLE_TIMEOUT = 600.0  # seconds a file panel may sit without an operation
PROGRESS_EVERY = 0.25  # seconds between two upload progress messages
MAX_NAME = 255  # bytes of a file name (ext4's limit)


class _Closed(Exception):
    """The browser closed the socket (or broke the protocol): end the session."""


class _Cancelled(Exception):
    """The browser cancelled the running transfer."""


def upload_name(raw: object) -> str:
    """A file name as the browser sent it, checked: a name, not a path."""
    if not isinstance(raw, str) or not raw or raw in (".", "..") or len(raw.encode()) > MAX_NAME:
        raise AgentFileError("bad_path", "the file needs a name of at most 255 bytes")
    if any(c in raw for c in "/\\\0") or any(ord(c) < 32 for c in raw):
        raise AgentFileError("bad_path", f"{raw[:60]!r} is not a plain file name (no slashes or control characters)")
    return raw


class FilesSession:
    """One file panel's socket after the ``101``: reads typed messages, runs one operation at a time."""

    def __init__(
        self, front: FrontConnection, leftover: bytes, agent: AgentFiles, offered: Peripherals, max_message: int
    ) -> None:
        self.front = front
        self.agent = agent
        self.offered = offered
        self.max_upload = offered.max_upload_bytes
        self.reader = FrameReader(max_message, messages=True)
        self._events: collections.deque[bytes | tuple[int, bytes]] = collections.deque()
        self._leftover = leftover
        self._message = -1  # opcode of the data message being read
        self._text = bytearray()
        self.bytes_in = self.bytes_out = 0

    # -- frames out -------------------------------------------------------------------------------------------
    def send(self, payload: dict[str, Any]) -> None:
        send_text(self.front, payload)

    def _binary(self, data: bytes) -> None:
        self.front.write(frame_header(OP_BINARY, len(data)))
        self.front.write(data)
        self.bytes_out += len(data)

    def close(self, code: int, reason: str) -> None:
        payload = close_payload(code, reason)
        self.front.write(frame_header(OP_CLOSE, len(payload)) + payload)
        self.front.close()

    # -- frames in --------------------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        try:
            self._events.extend(self.reader.feed(data))
        except FrameError as e:
            self.close(e.code, e.reason)
            raise _Closed from None

    async def _fill(self, timeout: float) -> None:
        if self._leftover:
            data, self._leftover = self._leftover, b""
        else:
            try:
                data = await self.front.receive(timeout)
            except TimeoutError:
                self.close(CLOSE_NORMAL, "idle: open the file panel again")
                raise _Closed from None
        if not data:
            raise _Closed
        self._feed(data)

    async def next_message(self, timeout: float = IDLE_TIMEOUT) -> tuple[int, bytes]:
        """The next whole text message ``(OP_TEXT, payload)`` or binary chunk ``(OP_BINARY, bytes)``; an end of
        binary message is ``(OP_BINARY, b"")``.  Pings are answered here; a close ends the session."""
        message = await self._read_message(timeout, wait=True)
        assert message is not None
        return message

    async def buffered_message(self) -> tuple[int, bytes] | None:
        """Like ``next_message``, from what the browser has already sent; None, without waiting, when that holds
        no whole message (a ping alone is answered, and is no message)."""
        return await self._read_message(IDLE_TIMEOUT, wait=False)

    async def _read_message(self, timeout: float, *, wait: bool) -> tuple[int, bytes] | None:
        while True:
            while not self._events:
                if not wait and not (self._leftover or self.front.pending):
                    return None
                await self._fill(timeout)
            event = self._events.popleft()
            if isinstance(event, bytes):
                if self._message == OP_TEXT:
                    self._text += event
                    continue
                self.bytes_in += len(event)
                return OP_BINARY, event
            opcode, payload = event
            if opcode == MSG_BEGIN:
                self._message = payload[0]
            elif opcode == MSG_END:
                was, self._message = self._message, -1
                if was == OP_TEXT:
                    text, self._text = bytes(self._text), bytearray()
                    return OP_TEXT, text
                return OP_BINARY, b""
            elif opcode == OP_PING:
                self.front.write(frame_header(OP_PONG, len(payload)) + payload)
            elif opcode == OP_CLOSE:
                self.close(CLOSE_NORMAL, "bye")
                raise _Closed

    # -- the session ------------------------------------------------------------------------------------------
    async def run(self) -> None:
        offered = self.offered
        ready = {
            "max_upload_bytes": self.max_upload,
            "files": offered.files,
            "printing": offered.printing,
            "print_dir": PRINT_DIR,
        }
        self.send({"ready": ready})
        try:
            while True:
                opcode, payload = await self.next_message()
                if opcode != OP_TEXT:
                    continue  # the tail of an upload that failed or was cancelled
                await self._operation(payload)
        except _Closed:
            pass

    async def _operation(self, payload: bytes) -> None:
        try:
            msg = json.loads(payload)
            op = msg.get("op") if isinstance(msg, dict) else None
        except ValueError:
            msg, op = {}, None
        t0 = time.monotonic()
        try:
            if not self.offered.files:
                self._printing_only(op, msg)
            if op == "list":
                directory = msg.get("dir", "Downloads")
                if not isinstance(directory, str) or len(directory) > 4096:
                    raise AgentFileError("bad_path", "dir must be a folder of your home, e.g. Downloads")
                self.send({"op": "list", **await self.agent.list(directory)})
            elif op == "upload":
                await self._upload(msg)
            elif op == "download":
                await self._download(msg)
            elif op == "cancel":
                return  # nothing runs
            else:
                raise AgentFileError("bad_request", 'send {"op": "list" | "upload" | "download" | "cancel", ...}')
        except _Cancelled:
            self.send({"op": op, "error": {"code": "cancelled", "message": "cancelled"}})
            log.info("broker.files", op=op, result="cancelled", ms=round((time.monotonic() - t0) * 1000))
        except AgentFileError as e:
            self.send({"op": op, "error": {"code": e.code, "message": e.message}})
            log.info("broker.files", op=op, result="failed", code=e.code)

    def _printing_only(self, op: object, msg: dict[str, Any]) -> None:
        """With files off and printing on, the channel only lists and fetches print jobs."""
        target = msg.get("dir") if op == "list" else msg.get("path") if op == "download" else None
        jobs = isinstance(target, str) and (target == PRINT_DIR if op == "list" else _in_print_dir(target))
        if op != "cancel" and not jobs:
            raise AgentFileError(
                "files_disabled", "your administrator turned file transfer off: only print jobs come through"
            )

    async def _upload(self, msg: dict[str, Any]) -> None:
        name = upload_name(msg.get("name"))
        size = msg.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise AgentFileError("bad_request", "size must be the file's size in bytes")
        if size > self.max_upload:
            raise AgentFileError(
                "too_large", f"the file is larger than this desktop's limit of {self.max_upload >> 20} MiB"
            )
        self.send({"op": "upload", "accepted": True})
        t0 = time.monotonic()
        done = await self.agent.upload(f"{UPLOADS}/{name}", size, self._upload_body(size), self.max_upload)
        self.send({"op": "upload", "done": done})
        log.info("broker.files", op="upload", result="ok", size=size, ms=round((time.monotonic() - t0) * 1000))

    async def _upload_body(self, size: int) -> AsyncIterator[bytes]:
        """The upload's bytes from the browser's binary frames, exactly ``size`` of them, in the pieces they were
        read in (each goes to the agent's socket as it is)."""
        left, last = size, time.monotonic()
        while left > 0:
            opcode, data = await self.next_message()
            if opcode == OP_TEXT:
                if _op_of(data) == "cancel":
                    raise _Cancelled
                self.send({"op": _op_of(data), "error": {"code": "busy", "message": "an upload is running"}})
                continue
            if len(data) > left:
                self.close(CLOSE_PROTOCOL, "more bytes than the upload announced")
                raise _Closed
            left -= len(data)
            if data:
                yield data
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY and left:
                self.send({"op": "upload", "progress": size - left})
                last = now

    async def _download(self, msg: dict[str, Any]) -> None:
        path = msg.get("path")
        if not isinstance(path, str) or not path or len(path) > 4096:
            raise AgentFileError("bad_path", "path must name a file of your home, e.g. Downloads/report.pdf")
        t0 = time.monotonic()
        async with self.agent.download(path) as (name, size, chunks):
            self.send({"op": "download", "file": {"name": name, "size": size}})
            sent = 0
            async for chunk in chunks:
                self._binary(chunk)
                sent += len(chunk)
                await self.front.drain()
                if self.front.gone:
                    raise _Closed
                while message := await self.buffered_message():  # a cancel (or anything else) sent meanwhile
                    opcode, data = message
                    if opcode == OP_TEXT and _op_of(data) == "cancel":
                        raise _Cancelled
                    if opcode == OP_TEXT:
                        self.send({"op": _op_of(data), "error": {"code": "busy", "message": "a download is running"}})
        self.send({"op": "download", "done": {"size": sent}})
        log.info("broker.files", op="download", result="ok", size=sent, ms=round((time.monotonic() - t0) * 1000))


def _in_print_dir(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and parts[0] == PRINT_DIR and parts[1] not in ("", ".", "..")


def _op_of(payload: bytes) -> str:
    try:
        msg = json.loads(payload)
    except ValueError:
        return ""
    return str(msg.get("op", "")) if isinstance(msg, dict) else ""


class FilesConnect:
    """Serves ``/ws/files``: ticket → the desktop's switch and limit → ``101`` → :class:`FilesSession`."""

    def __init__(self, db: Database, settings: BrokerSettings, agent_port: int) -> None:
        self.db = db
        self.settings = settings
        self.agent_port = agent_port

    async def serve(self, channel: HttpChannel, req: Any) -> None:
        front = channel.front
        granted = await grant(self.db, channel, req, FILES)
        if granted is None:
            return
        desk, offered = granted.desk, granted.offered
        front.write(granted.response)
        agent = AgentFiles(granted.ip, granted.agent_token, granted.login, port=self.agent_port)
        session = FilesSession(front, channel.leave(), agent, offered, self.settings.max_ws_message)
        bound = log.bind(desktop_id=desk.id, login=granted.login, peer=front.peer)
        bound.info("broker.files", result="open")
        try:
            await session.run()
        except Exception:
            bound.exception("broker.files_crashed")
            if not front.gone:
                session.close(CLOSE_ERROR, "internal error in the broker")
        bound.info("broker.files", result="closed", bytes_in=session.bytes_in, bytes_out=session.bytes_out)
