"""The broker's guard against Xvnc dropping a viewer that is resized before its own SetEncodings arrived."""

from __future__ import annotations

import struct

from deckard.broker.tunnel import RESIZE_ENCODINGS, ResizeGuard

SERVER_38 = b"RFB 003.008\n\x01\x01"  # version, one security type: None
CLIENT = b"RFB 003.008\n" + b"\x01" + b"\x01"  # version, None chosen, ClientInit (shared)
SET_PIXEL_FORMAT = b"\x00" + bytes(19)


def _client_through(guard: ResizeGuard, stream: bytes, cuts: list[int]) -> bytes:
    out, pos = b"", 0
    for cut in [*cuts, len(stream)]:
        out += guard.from_client(stream[pos:cut])
        pos = cut
    return out


def test_set_encodings_goes_right_after_client_init_however_the_streams_are_cut() -> None:
    stream = CLIENT + SET_PIXEL_FORMAT
    expected = CLIENT + RESIZE_ENCODINGS + SET_PIXEL_FORMAT
    for server_cut in range(len(SERVER_38) + 1):
        for cut in range(len(stream) + 1):
            guard = ResizeGuard()
            guard.from_server(SERVER_38[:server_cut])
            guard.from_server(SERVER_38[server_cut:] + b"\x00\x00\x00\x00")
            assert _client_through(guard, stream, [cut]) == expected, (server_cut, cut)
            assert guard.done
    guard = ResizeGuard()
    guard.from_server(SERVER_38)
    assert b"".join(guard.from_client(bytes([b])) for b in stream) == expected


def test_rfb_37_is_guarded_too() -> None:
    guard = ResizeGuard()
    guard.from_server(b"RFB 003.007\n\x01\x01")
    assert guard.from_client(b"RFB 003.007\n\x01\x01") == b"RFB 003.007\n\x01\x01" + RESIZE_ENCODINGS


def test_the_guard_steps_aside_for_handshakes_it_does_not_know() -> None:
    for server, client in (
        (b"RFB 003.008\n\x02\x01\x02", b"RFB 003.008\n\x02" + bytes(16) + b"\x01"),  # VNC auth offered
        (b"RFB 003.008\n\x00\x00\x00\x00\x05oops!", b"RFB 003.008\n"),  # the server refuses the client
        (b"RFB 003.003\n\x00\x00\x00\x01", b"RFB 003.003\n\x01"),  # RFB 3.3
    ):
        guard = ResizeGuard()
        guard.from_server(server)
        assert guard.done and guard.from_client(client + SET_PIXEL_FORMAT) == client + SET_PIXEL_FORMAT
    guard = ResizeGuard()
    guard.from_server(b"RFB 003.008\n\x02\x01\x02")  # None among others, and the client picks VNC auth
    assert guard.from_client(b"RFB 003.008\n\x02" + bytes(17)) == b"RFB 003.008\n\x02" + bytes(17)


def test_the_injected_message_is_a_set_encodings_of_the_two_resize_pseudo_encodings() -> None:
    kind, count = struct.unpack("!BxH", RESIZE_ENCODINGS[:4])
    assert (kind, count) == (2, 2) and len(RESIZE_ENCODINGS) == 4 + 4 * count
    assert struct.unpack("!2i", RESIZE_ENCODINGS[4:]) == (-223, -308)
