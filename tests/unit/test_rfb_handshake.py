"""The broker's two RFB handshakes: VNC authentication towards the desktop, security None towards the viewer."""

from __future__ import annotations

import struct

import pytest

from deckard.broker.tunnel import (
    RESIZE_ENCODINGS,
    RFB_GREETING,
    ClientHandshake,
    DesktopHandshake,
    HandshakeError,
)
from deckard.drivers.display import display_password, vnc_auth_response, vnc_password_file

CHALLENGE = bytes(range(16))
DENIED = b"\x00\x00\x00\x01" + b"\x00\x00\x00\x06denied"  # SecurityResult failed, with a reason
SET_PIXEL_FORMAT = b"\x00" + bytes(19)


def _feed_in_pieces(hs: DesktopHandshake, stream: bytes, cut: int) -> bytes:
    return hs.feed(stream[:cut]) + hs.feed(stream[cut:])


def test_vnc_des_matches_what_tigervnc_accepts() -> None:
    """Vectors checked against TigerVNC's Xvnc 1.12 (the password file of "password" is the well-known one)."""
    assert vnc_password_file("password").hex() == "dbd83cfd727a1458"
    assert vnc_auth_response("password", bytes(16)).hex() == "ff97502e9422f089" * 2


def test_display_password_is_eight_printable_characters_that_change_with_the_token() -> None:
    a, b = display_password("token-a"), display_password("token-b")
    assert len(a) == len(b) == 8 and a.isascii() and a.isprintable()
    assert a != b and a == display_password("token-a")


def test_desktop_handshake_answers_vnc_authentication_with_the_secret_however_the_bytes_are_cut() -> None:
    """The broker's version goes first, unasked (``opening``); then only the answers the desktop's bytes call for."""
    server = b"RFB 003.008\n" + b"\x02\x01\x02" + CHALLENGE + struct.pack("!I", 0)
    expected = b"\x02" + vnc_auth_response("s3cret!!", CHALLENGE)
    for cut in range(len(server) + 1):
        hs = DesktopHandshake("s3cret!!")
        assert hs.opening == RFB_GREETING
        assert _feed_in_pieces(hs, server, cut) == expected, cut
        assert hs.done


def test_desktop_handshake_takes_security_none_only_when_that_is_all_the_display_offers() -> None:
    hs = DesktopHandshake("s3cret!!")
    assert hs.feed(b"RFB 003.008\n\x01\x01\x00\x00\x00\x00") == b"\x01"
    assert hs.done


@pytest.mark.parametrize(
    ("server", "message"),
    [
        (b"SSH-2.0-OpenSSH\r\n", "not an RFB 3.8 server"),
        (b"RFB 003.003\n", "not an RFB 3.8 server"),
        (b"RFB 003.008\n\x01\x10", "no usable security type"),
        (
            b"RFB 003.008\n\x01\x02" + CHALLENGE + b"\x00\x00\x00\x01\x00\x00\x00\x06denied",
            "refused the broker: denied",
        ),
        (b"RFB 003.008\n\x00\x00\x00\x00\x04busy", "refused the broker: busy"),
        (b"RFB 003.008\n\x00\xff\xff\xff\xff", "refused the broker"),
        (b"RFB 003.008\n\x01\x01\x00\x00\x00\x00junk", "spoke before ClientInit"),
    ],
)
def test_desktop_handshake_refuses_a_display_that_breaks_the_protocol(server: bytes, message: str) -> None:
    hs = DesktopHandshake("s3cret!!")
    with pytest.raises(HandshakeError, match=message):
        hs.feed(server)


def _client_through(hs: ClientHandshake, stream: bytes, cut: int) -> tuple[bytes, bytes]:
    c1, d1 = hs.feed(stream[:cut])
    c2, d2 = hs.feed(stream[cut:])
    return c1 + c2, d1 + d2


@pytest.mark.parametrize(
    ("version", "security", "to_client"),
    [
        (b"RFB 003.008\n", b"\x01", b"\x01\x01" + b"\x00\x00\x00\x00"),
        (b"RFB 003.889\n", b"\x01", b"\x01\x01" + b"\x00\x00\x00\x00"),  # Apple's: served as 3.8
        (b"RFB 003.007\n", b"\x01", b"\x01\x01"),
        (b"RFB 003.003\n", b"", b"\x00\x00\x00\x01"),
        (b"RFB 003.005\n", b"", b"\x00\x00\x00\x01"),  # unknown minor: 3.3
    ],
)
def test_client_handshake_offers_none_and_puts_set_encodings_right_after_client_init(
    version: bytes, security: bytes, to_client: bytes
) -> None:
    stream = version + security + b"\x01" + SET_PIXEL_FORMAT
    for cut in range(len(stream) + 1):
        hs = ClientHandshake()
        got_client, got_desktop = _client_through(hs, stream, cut)
        assert got_client == to_client, cut
        assert got_desktop == b"\x01" + RESIZE_ENCODINGS + SET_PIXEL_FORMAT, cut
        assert hs.done
        assert hs.feed(b"more") == (b"", b"more")  # after the handshake: a plain relay


@pytest.mark.parametrize(
    "stream",
    [
        b"GET / HTTP/1.1\r\n",
        b"\x00" * 40,
        b"RFB 003.00x\n",
        b"RFB 003.008\n\x02" + bytes(16),  # VNC authentication: the broker offers None only
    ],
)
def test_client_handshake_drops_garbage_before_any_byte_reaches_the_desktop(stream: bytes) -> None:
    hs = ClientHandshake()
    to_desktop = b""
    with pytest.raises(HandshakeError):
        for i in range(len(stream)):
            to_desktop += hs.feed(stream[i : i + 1])[1]
    assert to_desktop == b""


def test_desktop_handshake_is_answered_once_only_the_displays_verdict_is_left() -> None:
    hs = DesktopHandshake("s3cret!!")
    hs.feed(b"RFB 003.008\n\x01\x02")
    assert not hs.answered  # the challenge is still to come
    hs.feed(CHALLENGE)
    assert hs.answered and not hs.done
    hs.feed(struct.pack("!I", 0))
    assert hs.answered and hs.done


@pytest.mark.parametrize(
    ("version", "security", "types", "result"),
    [
        (b"RFB 003.008\n", b"\x01", b"\x01\x01", b"\x00\x00\x00\x00"),
        (b"RFB 003.007\n", b"\x01", b"\x01\x01", b""),  # 3.7 sends no result for None
        (b"RFB 003.003\n", b"", b"", b"\x00\x00\x00\x01"),  # 3.3: the server's type is the step held
    ],
)
def test_client_handshake_holds_the_viewers_result_until_the_display_accepted_the_broker(
    version: bytes, security: bytes, types: bytes, result: bytes
) -> None:
    """The two handshakes run side by side: a viewer that sends everything at once gets no result, and none of
    its bytes go to the display, until the display's own verdict is in."""
    stream = version + security + b"\x01" + SET_PIXEL_FORMAT
    for cut in range(len(stream) + 1):
        hs = ClientHandshake()
        hs.desktop_ready = False
        got_client, got_desktop = _client_through(hs, stream, cut)
        assert (got_client, got_desktop) == (types, b""), cut
        assert not hs.done
        assert hs.release(True) == (result, b"\x01" + RESIZE_ENCODINGS + SET_PIXEL_FORMAT), cut
        assert hs.done and hs.desktop_ready


def test_client_handshake_released_before_the_viewer_got_there_does_not_hold() -> None:
    hs = ClientHandshake()
    hs.desktop_ready = False
    assert hs.feed(b"RFB 003.008\n") == (b"\x01\x01", b"")
    assert hs.release(True) == (b"", b"")
    assert hs.feed(b"\x01\x01") == (b"\x00\x00\x00\x00", b"\x01" + RESIZE_ENCODINGS)


@pytest.mark.parametrize(
    ("version", "security", "refusal"),
    [
        (b"RFB 003.008\n", b"\x01", b"\x00\x00\x00\x01\x00\x00\x00\x03why"),
        (b"RFB 003.007\n", b"\x01", b""),  # nothing to say it with: the tunnel just closes
        (b"RFB 003.003\n", b"", b"\x00\x00\x00\x00\x00\x00\x00\x03why"),
    ],
)
def test_client_handshake_tells_the_viewer_when_the_display_refused_the_broker(
    version: bytes, security: bytes, refusal: bytes
) -> None:
    hs = ClientHandshake()
    hs.desktop_ready = False
    hs.feed(version + security + b"\x01")
    assert hs.release(False, "why") == (refusal, b"")
    with pytest.raises(HandshakeError, match="refused the broker"):
        hs.feed(SET_PIXEL_FORMAT)
    assert not hs.done
