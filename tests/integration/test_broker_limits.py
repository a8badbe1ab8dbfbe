"""What a hostile client can hold in the broker, and what bad input gets: the limits of issue 8, end to end.

Real: the Broker with the farm's TLS on 127.0.0.1, the database (SQLite and PostgreSQL), the services, the
portal API in process.  Fake, as in ``test_broker_protocol.py`` whose fixture is reused: the node and the guest.
Each limit is lowered on the running broker's settings (the object the broker reads on every accept and
request) so the tests take seconds; the defaults are checked in ``test_the_limits_have_defaults``.
"""

# ruff: noqa: F811  (tests take the imported ``farm`` fixture as a parameter)

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import ssl
import struct
import weakref
from pathlib import Path

import httpx
import pytest
import structlog
from test_broker_protocol import (
    ALICE,
    BROKER_SECURITY,
    DISPLAY_ECHO,
    RFB_BANNER,
    UPGRADE,
    VIEWER_HANDSHAKE,
    Farm,
    RawClient,
    closed_by_peer,
    farm,  # noqa: F401  (the fixture)
)
from test_broker_websocket import WsClient, connect_ticket

from deckard.api.app import create_app
from deckard.broker import qvd, server
from deckard.broker.frames import CLOSE_TOO_BIG, FrameError, FrameReader, unmask
from deckard.broker.websocket import ViewOnlyFilter
from deckard.runtime.settings import BrokerSettings, Settings
from deckard.runtime.tls import client_context
from deckard.services import identity, tickets

# The broker's limits are the subject, not SQL (the claim and start on PostgreSQL: test_broker_protocol.py).
DATABASES = ["sqlite"]

# the broker's own limits and parsing act on the socket before any query (the fixture's setup aside): their
# PostgreSQL run would repeat the SQLite one, so they run once; the ticket limits count rows and run on both
BROKER_ONLY = pytest.mark.databases("sqlite")


async def open_tls(farm: Farm, source: str = "127.0.0.1") -> RawClient:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        farm.broker.port,
        ssl=client_context(farm.ca),
        server_hostname="127.0.0.1",
        local_addr=(source, 0),
    )
    return RawClient(reader, writer)


async def refused(farm: Farm, source: str = "127.0.0.1") -> bool:
    """True when the broker resets a new connection from ``source`` before it can be used."""
    try:
        c = await asyncio.wait_for(open_tls(farm, source), 3)
    except (ConnectionError, ssl.SSLError, OSError, TimeoutError):
        return True
    try:
        status = (await asyncio.wait_for(c.request("/qvd/ping"), 3))[0]
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
        return True
    finally:
        await c.close()
    return status != 200


async def closes_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(closed_by_peer(reader, seconds), seconds)
    except TimeoutError:
        return False


# ---------------------------------------------------------------- connection caps


@BROKER_ONLY
async def test_connections_over_the_per_address_cap_are_reset_but_other_addresses_and_logged_in_ones_pass(
    farm: Farm,
) -> None:
    farm.broker.settings.max_connections_per_address = 4
    held = [await open_tls(farm) for _ in range(4)]
    for c in held:  # all four are really served
        assert (await c.request("/qvd/ping"))[0] == 200
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await refused(farm), "a fifth anonymous connection from the same address must be refused"
    assert loop.time() - t0 < 1.0, "refused at once, not after a timeout"
    assert farm.broker.refused >= 1
    assert not await refused(farm, "127.0.0.2"), "another address is not affected"
    # a connection that logged in no longer counts against its address: an office behind one NAT
    assert (await held[0].request("/qvd/list_of_vm", ALICE))[0] == 200
    assert not await refused(farm)
    # closing one frees its place
    await held[1].close()
    await asyncio.sleep(0.2)
    extra = await open_tls(farm)
    assert (await extra.request("/qvd/ping"))[0] == 200
    for c in (held[0], *held[2:], extra):
        await c.close()


@BROKER_ONLY
async def test_the_global_cap_refuses_any_address_once_reached(farm: Farm) -> None:
    farm.broker.settings.max_connections = 3
    held = [await open_tls(farm, f"127.0.0.{i}") for i in (1, 2, 3)]
    assert await refused(farm, "127.0.0.4")
    await held[0].close()
    await asyncio.sleep(0.2)
    assert not await refused(farm, "127.0.0.4")
    for c in held[1:]:
        await c.close()


@BROKER_ONLY
async def test_closed_connections_leave_nothing_behind(farm: Farm) -> None:
    """Counters go back to zero and every connection object (with its buffers) is freed."""
    clients = [await open_tls(farm, "127.0.0.5") for _ in range(10)]
    for c in clients:
        c.writer.write(b"GET /qvd/ping HTTP/1.1\r\nX-Partial: " + b"x" * 4000)  # a half-sent head, buffered
    await asyncio.sleep(0.3)
    refs = [weakref.ref(f) for f in farm.broker._fronts]
    assert len(refs) == 10 and farm.broker.prelogin["127.0.0.5"] == 10
    for c in clients:
        await c.close()

    async def released() -> bool:
        return farm.broker.open_connections == 0 and not farm.broker._fronts

    await farm.wait_for("the connections to be released", released)
    assert "127.0.0.5" not in farm.broker.prelogin
    for _ in range(20):
        gc.collect()
        if all(r() is None for r in refs):
            break
        await asyncio.sleep(0.05)
    assert all(r() is None for r in refs), "a closed connection is still referenced"


@BROKER_ONLY
async def test_after_a_burst_of_closed_connections_the_heap_is_given_back(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[str] = []
    monkeypatch.setattr(server, "release_freed_memory", lambda: trims.append("heap") or True)
    release_idle = farm.broker.db.release_idle

    async def pools_first() -> None:  # the pooled connections' memory is freed before the heap is trimmed
        trims.append("pools")
        await release_idle()

    monkeypatch.setattr(farm.broker.db, "release_idle", pools_first)
    farm.broker.settings.max_connections_per_address = 1000
    writers = []
    for _ in range(server.TRIM_AFTER_BURST + 20):
        _reader, writer = await asyncio.open_connection("127.0.0.1", farm.broker.port)
        writers.append(writer)

    async def all_open() -> bool:
        return farm.broker.open_connections >= len(writers)

    await farm.wait_for("the connections to be accepted", all_open)
    assert not trims
    for writer in writers:
        writer.close()

    async def trimmed() -> bool:
        return "heap" in trims

    await farm.wait_for("the heap to be trimmed", trimmed, timeout=server.TRIM_DELAY + 5)
    assert farm.broker.open_connections == 0 and trims == ["pools", "heap"]
    assert server.release_freed_memory is not None and server._malloc_trim is not None, "glibc's malloc_trim"


# ---------------------------------------------------------------- pre-login timeouts


@BROKER_ONLY
async def test_a_client_that_never_finishes_tls_or_its_first_request_is_cut_off(farm: Farm) -> None:
    farm.broker.settings.first_request_timeout = 1.0
    # no TLS handshake at all
    reader, writer = await asyncio.open_connection("127.0.0.1", farm.broker.port)
    assert await closes_within(reader, 3.0), "a silent TCP connection must be closed after the handshake timeout"
    writer.close()
    # TLS, then nothing
    c = await open_tls(farm)
    assert await closes_within(c.reader, 3.0)
    await c.close()
    # TLS, then a request head a byte at a time (slowloris): the deadline is for the whole head
    c = await open_tls(farm)
    c.writer.write(b"GET /qvd/ping HTTP/1.1\r\n")

    async def dribble() -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, RuntimeError):
            for _ in range(40):
                c.writer.write(b"X")
                await asyncio.sleep(0.1)

    task = asyncio.create_task(dribble())
    assert await closes_within(c.reader, 3.0), "a head that never ends must not keep the connection"
    task.cancel()
    await c.close()


@BROKER_ONLY
async def test_before_login_an_idle_connection_is_closed_soon_after_login_it_may_wait(farm: Farm) -> None:
    farm.broker.settings.idle_timeout = 1.0
    anonymous = await open_tls(farm)
    assert (await anonymous.request("/qvd/ping"))[0] == 200
    assert await closes_within(anonymous.reader, 3.0), "after an unauthenticated ping the connection may not idle"
    await anonymous.close()
    user = await open_tls(farm)
    assert (await user.request("/qvd/list_of_vm", ALICE))[0] == 200
    await asyncio.sleep(2.0)  # longer than idle_timeout: QVD's client waits here for its user to pick a desktop
    assert (await user.request("/qvd/ping"))[0] == 200
    await user.close()


@BROKER_ONLY
async def test_a_request_head_over_the_limit_is_431(farm: Farm) -> None:
    c = await open_tls(farm)
    c.send("/qvd/ping", {"X-Big": "y" * 20_000})
    status_line, headers = await c.head()
    assert status_line == "HTTP/1.1 431 Request Header Fields Too Large"
    assert headers["x-deckard-error"] == "request_head_too_large"
    assert await closed_by_peer(c.reader)
    await c.close()
    c = await open_tls(farm)  # never-ending head: refused as soon as it is over the limit
    c.writer.write(b"GET /qvd/ping HTTP/1.1\r\nX-Big: " + b"y" * 20_000)
    assert (await c.head())[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    await c.close()


# ---------------------------------------------------------------- input validation


BAD_DESKTOP_IDS = [
    "99999999999999999999999",
    "9223372036854775808",
    "%C2%B2",
    "%EF%BC%91",
    "-1",
    "1e3",
    "0x1",
    "%201%20x",
]


@BROKER_ONLY
async def test_a_desktop_id_that_is_not_ascii_digits_within_int64_is_422_and_the_connection_stays(farm: Farm) -> None:
    """Huge, int64 + 1, superscript two, full-width one, negative, exponent, hex, spaces: all on one connection."""
    c = await open_tls(farm)
    for desktop_id in BAD_DESKTOP_IDS:
        for path, headers in (("/qvd/connect_to_vm", {**ALICE, **UPGRADE}), ("/qvd/stop_vm", ALICE)):
            status, reply_headers, body, _ = await c.request(f"{path}?id={desktop_id}", headers)
            assert (status, reply_headers.get("x-deckard-error")) == (422, "bad_id"), (path, desktop_id, body)
            assert (await c.request("/qvd/ping"))[0] == 200, "the connection stays usable"
    await c.close()
    assert await farm.connection_rows(farm.alice_desk["id"]) == []


@BROKER_ONLY
async def test_a_bug_in_a_handler_is_logged_with_its_traceback_and_answered_500(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: object) -> list[dict[str, object]]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(qvd, "user_desktops", broken)
    c = await open_tls(farm)
    with structlog.testing.capture_logs() as logs:
        status, headers, body, _ = await c.request("/qvd/list_of_vm", ALICE)
    assert (status, headers["x-deckard-error"]) == (500, "internal")
    assert b"a bug" not in body, "internals stay in the log"
    crashed = [e for e in logs if e["event"] == "broker.request_crashed"]
    assert crashed and crashed[0].get("exc_info") is True and crashed[0]["path"] == "/qvd/list_of_vm"
    await c.close()


@BROKER_ONLY
async def test_a_bad_target_is_400_not_a_dropped_connection(farm: Farm) -> None:
    c = await open_tls(farm)
    c.writer.write(b"GET http://[::1/qvd/ping HTTP/1.1\r\n\r\n")
    status_line, headers = await c.head()
    assert status_line == "HTTP/1.1 400 Bad Request" and headers["x-deckard-error"] == "bad_request"
    await c.close()


# ---------------------------------------------------------------- WebSocket frames


async def open_relay(farm: Farm) -> WsClient:
    ticket = await connect_ticket(farm)
    ws, status, _ = await WsClient.open(farm, f"/ws/connect?ticket={ticket}")
    assert status == 101
    assert await ws.binary(len(RFB_BANNER)) == RFB_BANNER
    ws.send(VIEWER_HANDSHAKE)
    assert await ws.binary(len(BROKER_SECURITY) + len(DISPLAY_ECHO)) == BROKER_SECURITY + DISPLAY_ECHO
    return ws


@BROKER_ONLY
async def test_a_binary_frame_is_relayed_as_it_arrives_not_when_complete(farm: Farm) -> None:
    ws = await open_relay(farm)
    payload = os.urandom(1 << 20)
    mask = os.urandom(4)
    masked = unmask(payload, mask)
    ws.writer.write(struct.pack("!BBQ", 0x82, 0x80 | 127, len(payload)) + mask + masked[:65537])
    # the first part comes back (echoed by the display) while the frame is still incomplete
    assert await ws.binary(65537) == payload[:65537]
    ws.writer.write(masked[65537:65540])  # the mask's phase carries across odd splits
    ws.writer.write(masked[65540:])
    assert await ws.binary(len(payload) - 65537) == payload[65537:]
    await ws.close()


@BROKER_ONLY
async def test_a_text_message_over_the_cap_closes_with_1009(farm: Farm) -> None:
    ws = await open_relay(farm)
    ws.send(b"x" * (BrokerSettings().max_ws_message + 1), opcode=1)
    while True:
        op, data = await ws.frame()
        if op == 8:
            break
    assert struct.unpack("!H", data[:2])[0] == CLOSE_TOO_BIG
    await ws.close()


def masked_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    return head + mask + unmask(payload, mask)


def test_frame_reader_gives_the_same_bytes_whatever_the_split_and_holds_no_payload() -> None:
    payload = os.urandom(70_000)
    wire = (
        masked_frame(2, payload[:1000], fin=False)
        + masked_frame(9, b"ping")
        + masked_frame(0, payload[1000:], fin=True, mask=b"\xff\x00\xaa\x55")
        + masked_frame(8, struct.pack("!H", 1000))
    )
    for cut in (1, 2, 3, 7, 13, 999, 4096):
        reader = FrameReader()
        data, controls = b"", []
        for i in range(0, len(wire), cut):
            for event in reader.feed(wire[i : i + cut]):
                if isinstance(event, bytes):
                    data += event
                else:
                    controls.append(event)
            assert len(reader._control) <= 125 and len(reader._head) <= 14  # nothing else is kept
        assert data == payload, cut
        assert controls == [(9, b"ping"), (8, struct.pack("!H", 1000))]
        assert reader.closed


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (masked_frame(1, b"x" * 300_000), 1009),
        (masked_frame(1, b"x" * 200_000, fin=False) + masked_frame(0, b"x" * 100_000), 1009),
        (b"\x82\x05hello", 1002),  # unmasked
        (masked_frame(0, b"x"), 1002),  # continuation of nothing
        (masked_frame(2, b"x", fin=False) + masked_frame(2, b"y"), 1002),  # new message inside one
        (masked_frame(9, b"x" * 126), 1002),  # oversized control frame
        (masked_frame(9, b"x", fin=False), 1002),  # fragmented control frame
        (masked_frame(3, b"x"), 1002),  # reserved opcode
        (b"\xc2\x81abcdx", 1002),  # RSV1 without an extension
        (b"\x82\xff\x80\x00\x00\x00\x00\x00\x00\x00abcd", 1002),  # 64-bit length with the top bit set
    ],
)
def test_frame_reader_refuses_oversized_text_and_protocol_violations(wire: bytes, code: int) -> None:
    with pytest.raises(FrameError) as e:
        FrameReader().feed(wire)
    assert e.value.code == code


def test_view_only_filter_skips_a_huge_clipboard_without_buffering_it() -> None:
    f = ViewOnlyFilter()
    assert f.feed(RFB_BANNER + b"\x01\x00") == RFB_BANNER + b"\x01\x01"
    fbur = bytes([3, 0, 0, 0, 0, 0, 4, 0, 3, 0])
    assert f.feed(struct.pack("!BxxxI", 6, 1 << 30)) == b""  # ClientCutText announcing 1 GiB
    for _ in range(16):
        assert f.feed(b"z" * 65536) == b""
        assert len(f._buf) == 0
    assert f._skip == (1 << 30) - 16 * 65536
    f._skip = 3
    assert f.feed(b"end" + fbur) == fbur and f.dropped == 1
    with pytest.raises(ValueError):
        f.feed(struct.pack("!BxH", 2, 60_000))  # SetEncodings too large to keep


# ---------------------------------------------------------------- tickets


async def test_ticket_issue_is_limited_per_user_with_a_stable_code(farm: Farm, tmp_path: Path) -> None:
    app = create_app(farm.db, Settings(home=tmp_path))
    desk_id = farm.alice_desk["id"]
    limit = BrokerSettings().max_live_tickets
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://portal.test") as http:
        token = (await http.post("/portal/login", json={"login": "alice", "password": "pw-alice"})).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        for _ in range(limit):
            assert (await http.post(f"/portal/desktops/{desk_id}/ticket", headers=auth)).status_code == 200
        res = await http.post(f"/portal/desktops/{desk_id}/ticket", headers=auth)
        assert res.status_code == 429, res.text
        assert res.json()["error"]["code"] == "too_many_tickets"
        bob = (await http.post("/portal/login", json={"login": "bob", "password": "pw-bob"})).json()["token"]
        res = await http.post(
            f"/portal/desktops/{farm.bob_desk['id']}/ticket", headers={"Authorization": f"Bearer {bob}"}
        )
        assert res.status_code == 200, "another user has their own allowance"


async def test_ticket_issue_rate_counts_used_tickets_too(farm: Farm) -> None:
    user = (await identity.login_password(farm.db, "alice", "pw-alice")).user
    limits = tickets.TicketLimits(per_minute=3, live=100)
    issued = [
        (await tickets.issue_connect_ticket(farm.db, user, farm.alice_desk["id"], limits=limits))[0] for _ in range(3)
    ]
    await tickets.redeem_ticket(farm.db, issued[0])
    with pytest.raises(tickets.TooManyTickets) as e:
        await tickets.issue_connect_ticket(farm.db, user, farm.alice_desk["id"], limits=limits)
    assert e.value.status == 429 and e.value.details["retry_after_s"] > 0
    # the live cap: using one ticket makes room for one more
    live = tickets.TicketLimits(per_minute=100, live=3)
    with pytest.raises(tickets.TooManyTickets):  # two of the three are still live, plus one: room for none
        await tickets.issue_connect_ticket(farm.db, user, farm.alice_desk["id"], limits=tickets.TicketLimits(100, 2))
    await tickets.issue_connect_ticket(farm.db, user, farm.alice_desk["id"], limits=live)


async def test_a_ticket_refused_for_another_desktop_or_a_bad_id_is_not_spent(farm: Farm) -> None:
    ticket = await connect_ticket(farm)
    for target in (f"/qvd/connect_to_vm?id={farm.bob_desk['id']}", "/ws/connect?id=%EF%BC%91"):
        c, status, headers = await WsClient.open(farm, f"{target}&ticket={ticket}")
        assert status in (403, 422), (target, status)
        assert headers["x-deckard-error"] in ("ticket_mismatch", "bad_id")
        await c.close()
    ws, status, _ = await WsClient.open(farm, f"/qvd/connect_to_vm?id={farm.alice_desk['id']}&ticket={ticket}")
    assert status == 101, "the ticket is still good for its own desktop"
    await ws.close()


def test_the_limits_have_defaults() -> None:
    s = BrokerSettings()
    assert (s.max_connections, s.max_connections_per_address) == (4096, 64)
    assert (s.first_request_timeout, s.idle_timeout, s.authenticated_idle_timeout) == (10.0, 15.0, 300.0)
    assert (s.max_request_head, s.max_ws_message) == (16 * 1024, 256 * 1024)
    assert (s.tickets_per_minute, s.max_live_tickets) == (30, 5)
