"""WebSocket framing (RFC 6455) for the broker, sans-IO: client frames parsed as they arrive, server frames built.

Why not wsproto's framing: wsproto does the broker's handshake, but ``reference/platform.md`` measured a
wsproto-framed relay at less than half the throughput of frames parsed here with bulk unmasking (C when the
``websockets`` package is installed).

Why client frames are streamed: a frame's header announces its length up to 2^63 bytes; buffering a frame until
it is complete would let any client make the broker hold that much.  :class:`FrameReader` unmasks a data frame's
payload chunk by chunk as it arrives (the mask's phase carried across chunk boundaries) and hands it on at
once, so a connection holds a frame header and at most one control frame (125 bytes).  Text messages are
capped (close ``1009``); a binary message of any size is fine, it never sits in memory.
"""

from __future__ import annotations

import struct

from websockets.speedups import apply_mask  # C; a declared dependency for this one function

MAX_MESSAGE = 256 * 1024  # default cap of a text message (BrokerSettings.max_ws_message)
MAX_CONTROL = 125  # RFC 6455 §5.5
MAX_LENGTH = 2**63 - 1  # the most significant bit of a 64-bit length must be 0
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NORMAL, CLOSE_PROTOCOL, CLOSE_TOO_BIG, CLOSE_ERROR = 1000, 1002, 1009, 1011


def unmask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` (RFC 6455 §5.3), in C."""
    return apply_mask(data, key) if data else b""  # reads any buffer: a memoryview slice is not copied first


def frame_header(opcode: int, length: int) -> bytes:
    """A final, unmasked (server → client) frame header."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


def close_payload(code: int, reason: str) -> bytes:
    raw = reason.encode()[:120]  # a control frame carries at most 125 bytes
    while raw:  # do not cut a UTF-8 sequence in half
        try:
            raw.decode()
            break
        except UnicodeDecodeError:
            raw = raw[:-1]
    return struct.pack("!H", code) + raw


class FrameError(Exception):
    """The client broke RFC 6455 (or a limit): close the WebSocket with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


Control = tuple[int, bytes]  # (opcode, payload) of a ping, pong or close frame
# pseudo-opcodes of FrameReader(messages=True): a data message begins (payload: its opcode) and ends
MSG_BEGIN, MSG_END = 0x10, 0x11


class FrameReader:
    """Client → broker frames, parsed as bytes arrive (sans-IO; ``feed`` raises :class:`FrameError`).

    ``feed`` returns, in order, data payload chunks (``bytes``: binary, text and continuation frames, unmasked)
    and complete control frames (``(opcode, payload)``).  After a close frame nothing more is read.  With
    ``messages`` (a channel of typed messages, not a byte stream), each data message is also bracketed by
    ``(MSG_BEGIN, bytes([opcode]))`` and ``(MSG_END, b"")``.
    """

    def __init__(self, max_message: int = MAX_MESSAGE, *, messages: bool = False) -> None:
        self.max_message = max_message
        self.messages = messages
        self.closed = False
        self._head = bytearray()  # a frame header split across reads
        self._opcode = -1  # of the frame whose payload is being read; -1 between frames
        self._fin = False
        self._key = b""
        self._offset = 0  # payload bytes of this frame already read: the phase of the mask
        self._left = 0  # payload bytes of this frame still to come
        self._control = bytearray()
        self._message = -1  # opcode of the data message in progress (fragmented); -1 when none
        self._message_size = 0

    @staticmethod
    def _header_size(b1: int) -> int:
        n = b1 & 0x7F
        return 6 if n < 126 else 8 if n == 126 else 14  # with the 4-byte mask key

    def feed(self, data: bytes) -> list[bytes | Control]:
        out: list[bytes | Control] = []
        pos, end = 0, len(data)
        view = memoryview(data)  # payload slices without copies: unmask makes the one copy
        while pos < end and not self.closed:
            if self._opcode < 0:
                head = self._head
                if not head and end - pos >= 2:
                    size = self._header_size(data[pos + 1])
                    if end - pos >= size:
                        self._begin(data, pos, size, out)
                        pos += size
                        left = self._left
                        if 0 < left <= end - pos and self._opcode < 8:  # a whole data frame: no state to keep
                            out.append(unmask(view[pos : pos + left], self._key))
                            pos += left
                            self._left = 0
                            self._end(out)
                        continue
                need = 2 if len(head) < 2 else self._header_size(head[1])
                take = min(need - len(head), end - pos)
                head += data[pos : pos + take]
                pos += take
                if len(head) >= 2 and len(head) == self._header_size(head[1]):
                    self._begin(head, 0, len(head), out)
                    head.clear()
                continue
            take = min(self._left, end - pos)
            chunk = view if pos == 0 and take == end else view[pos : pos + take]
            phase = self._offset & 3
            plain = unmask(chunk, self._key if not phase else self._key[phase:] + self._key[:phase])
            self._offset += take
            self._left -= take
            pos += take
            if self._opcode >= 8:
                self._control += plain
            else:
                out.append(plain)
            if not self._left:
                self._end(out)
        return out

    def _begin(self, buf: bytes | bytearray, pos: int, size: int, out: list[bytes | Control]) -> None:
        """A complete frame header at ``buf[pos:pos + size]``: check it, then expect its payload."""
        b0, b1 = buf[pos], buf[pos + 1]
        if b0 & 0x70:
            raise FrameError(CLOSE_PROTOCOL, "reserved bits set without an extension")
        if not b1 & 0x80:
            raise FrameError(CLOSE_PROTOCOL, "the client sent an unmasked frame")
        opcode = b0 & 0x0F
        fin = bool(b0 & 0x80)
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
        elif length == 127:
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if length > MAX_LENGTH:
                raise FrameError(CLOSE_PROTOCOL, "frame length out of range")
        if opcode == OP_BINARY and self._message < 0:  # the common case first: a new binary message
            self._message, self._message_size = opcode, length
            if self.messages:
                out.append((MSG_BEGIN, b"\x02"))
        elif opcode >= 8:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                raise FrameError(CLOSE_PROTOCOL, f"unknown control opcode {opcode}")
            if not fin or length > MAX_CONTROL:
                raise FrameError(CLOSE_PROTOCOL, "control frames must be final and at most 125 bytes")
        elif opcode == OP_CONT:
            if self._message < 0:
                raise FrameError(CLOSE_PROTOCOL, "continuation frame without a message to continue")
            self._message_size += length
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._message >= 0:
                raise FrameError(CLOSE_PROTOCOL, "a new message began before the last one ended")
            self._message, self._message_size = opcode, length
            if self.messages:
                out.append((MSG_BEGIN, bytes((opcode,))))
        else:
            raise FrameError(CLOSE_PROTOCOL, f"unknown data opcode {opcode}")
        if self._message == OP_TEXT and opcode < 8 and self._message_size > self.max_message:
            raise FrameError(CLOSE_TOO_BIG, f"text message larger than {self.max_message} bytes")
        self._opcode, self._fin, self._left, self._offset = opcode, fin, length, 0
        self._key = bytes(buf[pos + size - 4 : pos + size])
        if not length:
            self._end(out)

    def _end(self, out: list[bytes | Control]) -> None:
        """The current frame's payload is complete."""
        opcode, self._opcode = self._opcode, -1
        if opcode >= 8:
            out.append((opcode, bytes(self._control)))
            self._control.clear()
            self.closed = opcode == OP_CLOSE
        elif self._fin:
            self._message = -1
            if self.messages:
                out.append((MSG_END, b""))
