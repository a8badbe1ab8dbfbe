"""The session policies' rules (``model/session_policy.py``) without a farm: what is due when, given a desktop's
policy and timestamps; the relative list filters; and the agent's side (its idle query and its notices)."""

from __future__ import annotations

import datetime as dt
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_vma import agent_url, call  # noqa: F401 (agent_url is a fixture)

from deckard.cli.desktops import table_row
from deckard.model.config_keys import KEYS
from deckard.model.errors import BadInput
from deckard.model.schemas import Desktop
from deckard.model.session_policy import (
    Action,
    Notice,
    Reason,
    SessionFacts,
    SessionPolicy,
    decide,
    describe_duration,
    parse_duration,
)
from deckard.services.listing import Filter
from deckard.services.session_policy import since_filters, stop_reason
from deckard.vma import agent as vma

T0 = dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def connected(since: float = 0, input_at: float | None = 0, **kw: Any) -> SessionFacts:
    """A desktop started at T0 whose user connected at ``since`` and last typed at ``input_at``."""
    return SessionFacts(T0, "connected", at(since), None if input_at is None else at(input_at), **kw)


def disconnected(since: float | None, **kw: Any) -> SessionFacts:
    return SessionFacts(T0, "disconnected", None if since is None else at(since), None, **kw)


def test_the_default_configuration_has_every_policy_off() -> None:
    """A farm that sets nothing behaves as before: no rule ever falls due."""
    policy = SessionPolicy.from_config({k: v.default for k, v in KEYS.items() if k.startswith("session.")})
    assert not policy.enabled and not policy.watches_input
    for facts in (connected(input_at=0), disconnected(0)):
        assert decide(policy, facts, at(10 * 86400)) == decide(SessionPolicy(), facts, at(0))
        assert decide(policy, facts, at(10 * 86400)).action is None


def test_a_disconnected_desktop_stops_exactly_its_delay_after_the_disconnect() -> None:
    policy = SessionPolicy(stop_after_disconnect_s=600)
    early = decide(policy, disconnected(100), at(699))
    assert early.action is None and early.check_at == at(700)
    due = decide(policy, disconnected(100), at(700))
    assert (due.action, due.reason) == (Action.STOP, Reason.DISCONNECTED)


def test_a_desktop_nobody_connected_to_counts_from_its_start_not_from_an_old_disconnect() -> None:
    """``user_state_at`` of a desktop started afresh is its last stop's: the delay counts from the start."""
    policy = SessionPolicy(stop_after_disconnect_s=60)
    before_start = disconnected(-86400)
    assert decide(policy, before_start, at(59)).action is None
    assert decide(policy, before_start, at(60)).reason == Reason.DISCONNECTED


def test_a_connected_or_connecting_user_is_never_stopped_for_being_disconnected() -> None:
    policy = SessionPolicy(stop_after_disconnect_s=1)
    assert decide(policy, connected(input_at=0), at(3600)).action is None
    connecting = SessionFacts(T0, "connecting", at(0), None)
    assert decide(policy, connecting, at(3600)) == decide(SessionPolicy(stop_after_disconnect_s=1), connecting, at(1))


def test_idle_warns_first_then_acts_no_sooner_than_the_notice_after_it() -> None:
    policy = SessionPolicy(idle_after_s=1800, idle_warn_s=300, idle_action=Action.STOP)
    quiet = decide(policy, connected(input_at=60), at(1000))
    assert quiet.action is None and quiet.notices == () and quiet.check_at == at(60 + 1500)
    warn = decide(policy, connected(input_at=60), at(1560))
    assert warn.action is None and warn.notices == (Notice(Reason.IDLE, Action.STOP, at(1860)),)
    warned = connected(input_at=60, idle_warned_at=at(1560))
    assert decide(policy, warned, at(1859)).check_at == at(1860)
    acted = decide(policy, warned, at(1860))
    assert (acted.action, acted.reason) == (Action.STOP, Reason.IDLE)


def test_a_late_notice_defers_the_idle_action_by_the_whole_notice() -> None:
    """The node was away when the notice was due: the user still gets the full notice before the action."""
    policy = SessionPolicy(idle_after_s=600, idle_warn_s=120)
    late = decide(policy, connected(input_at=0), at(2000))
    assert late.action is None and late.notices == (Notice(Reason.IDLE, Action.DISCONNECT, at(2120)),)
    warned = connected(input_at=0, idle_warned_at=at(2000))
    assert decide(policy, warned, at(2119)).action is None
    assert decide(policy, warned, at(2120)).action == Action.DISCONNECT


def test_input_after_the_notice_cancels_it() -> None:
    policy = SessionPolicy(idle_after_s=600, idle_warn_s=120)
    came_back = connected(input_at=530, idle_warned_at=at(480))
    verdict = decide(policy, came_back, at(700))
    assert verdict.forget_idle_warning and verdict.action is None and verdict.check_at == at(530 + 480)
    left = disconnected(500, idle_warned_at=at(480))
    assert decide(policy, left, at(700)).forget_idle_warning


def test_idle_counts_from_the_connection_when_the_user_just_came_back() -> None:
    """The X server's idle time runs on while nobody is connected: a fresh connection is not idle."""
    policy = SessionPolicy(idle_after_s=600, idle_warn_s=0)
    returning = connected(since=5000, input_at=0)
    assert decide(policy, returning, at(5599)).action is None
    assert decide(policy, returning, at(5600)).action == Action.DISCONNECT


def test_without_input_information_no_idle_rule_applies() -> None:
    """An agent that cannot tell the idle time never gets its user disconnected on a guess."""
    policy = SessionPolicy(idle_after_s=60, idle_warn_s=0)
    assert decide(policy, connected(input_at=None), at(86400)) == decide(policy, connected(input_at=None), at(0))
    assert decide(policy, connected(input_at=None), at(86400)).check_at is None


def test_without_a_notice_the_idle_action_comes_at_the_idle_time() -> None:
    policy = SessionPolicy(idle_after_s=300, idle_warn_s=0, idle_action=Action.STOP)
    assert decide(policy, connected(input_at=100), at(399)).notices == ()
    assert decide(policy, connected(input_at=100), at(400)).action == Action.STOP


def test_max_length_is_a_hard_limit_with_one_notice_for_a_connected_user() -> None:
    policy = SessionPolicy(max_length_s=3600, max_length_warn_s=600)
    assert decide(policy, connected(), at(2999)).check_at == at(3000)
    notice = decide(policy, connected(), at(3000))
    assert notice.notices == (Notice(Reason.MAX_LENGTH, Action.STOP, at(3600)),) and notice.check_at == at(3600)
    assert decide(policy, connected(length_warned=True), at(3000)).notices == ()
    assert decide(policy, disconnected(0), at(3000)).notices == ()  # nobody to read it
    for facts in (connected(length_warned=True), connected(), disconnected(0)):
        stop = decide(policy, facts, at(3600))
        assert (stop.action, stop.reason) == (Action.STOP, Reason.MAX_LENGTH)


def test_a_stop_wins_over_a_disconnect_and_notices() -> None:
    policy = SessionPolicy(
        idle_after_s=60, idle_warn_s=0, idle_action=Action.DISCONNECT, max_length_s=100, stop_after_disconnect_s=10
    )
    assert decide(policy, connected(input_at=0), at(100)).reason == Reason.MAX_LENGTH
    assert decide(policy, connected(input_at=0), at(70)).action == Action.DISCONNECT
    both = SessionPolicy(idle_after_s=600, idle_warn_s=300, max_length_s=1000, max_length_warn_s=800)
    assert {n.reason for n in decide(both, connected(input_at=0), at(400)).notices} == {Reason.IDLE, Reason.MAX_LENGTH}


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), (" 1D ", 86400)])
def test_durations_take_seconds_or_a_unit(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2 h", "-5m", "1.5h", "2w", "h", "99999999999", "\uff11h", "1h30m"])
def test_bad_durations_are_refused_with_a_stable_code(text: str) -> None:
    with pytest.raises(BadInput) as e:
        parse_duration(text, "idle_for")
    assert e.value.code == "bad_duration" and "idle_for" in e.value.message


def test_durations_read_as_people_say_them() -> None:
    cases = {0: "0s", 45: "45s", 90: "1m30s", 720: "12m", 7500: "2h05m", 7200: "2h", 277200: "3d5h", -3: "0s"}
    assert {s: describe_duration(s) for s in cases} == cases


def test_relative_filters_bound_the_listed_since_fields_with_the_api_clock() -> None:
    got = since_filters({"disconnected_for": "2h", "idle_for": None, "idle_for_x": None}, now=at(7200))
    assert got == [Filter("disconnected_since", "lte", T0.isoformat())]
    with pytest.raises(BadInput):
        since_filters({"idle_for": "soon"})


def test_a_policy_stop_names_its_rule_first() -> None:
    policy = SessionPolicy(stop_after_disconnect_s=7200, idle_after_s=1800, max_length_s=36000)
    assert (
        stop_reason(Reason.DISCONNECTED, policy) == "session policy (disconnected): nobody was connected to it for 2h"
    )
    assert stop_reason(Reason.IDLE, policy).startswith("session policy (idle): ")
    assert "10h" in stop_reason(Reason.MAX_LENGTH, policy)


# ---- the agent's side ---------------------------------------------------------------------------------------


def test_the_agent_says_it_cannot_tell_the_idle_time_without_a_display(agent_url: str) -> None:  # noqa: F811
    status, body = call(f"{agent_url}/vma/idle")
    assert (status, body) == (200, {"ok": True, "state": "stopped", "user": None, "idle_ms": None})


def test_the_agent_checks_a_notice_and_shows_none_without_a_display(agent_url: str) -> None:  # noqa: F811
    status, body = call(f"{agent_url}/vma/session_notice?reason=idle&action=stop&in_s=300")
    assert (status, body) == (200, {"ok": True, "notified": "none"})
    for query in ("reason=bored&action=stop&in_s=1", "reason=idle&action=reboot&in_s=1", "reason=idle&action=stop"):
        status, body = call(f"{agent_url}/vma/session_notice?{query}")
        assert status == 400 and body["error"]["code"] == "bad_input"


def test_notices_say_what_will_happen_and_when() -> None:
    assert "stopped in 5 minutes" in vma.session_notice_text("idle", "stop", 300)
    assert "disconnected in 45 seconds" in vma.session_notice_text("idle", "disconnect", 45)
    assert "maximum length" in vma.session_notice_text("max_length", "stop", 7200)
    assert vma.in_words(7260) == "2 hours 1 minutes" and vma.in_words(1) == "1 second"


class FakeXServer:
    """Enough of an X server on a unix socket for one MIT-SCREEN-SAVER QueryInfo: the replies the protocol
    specifies, with a vendor string and pixmap formats in front of the root window, as Xvnc sends them."""

    def __init__(self, path: Path, *, idle_ms: int, extension: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.idle_ms, self.extension = idle_ms, extension
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(12)  # setup request
            vendor = b"The X.Org Foundatio"  # 19 bytes: padded to 20
            fixed = struct.pack(
                "<IIIIHHBBBBBBBB4x", 12101003, 0x400000, 0x1FFFFF, 256, len(vendor), 65535, 1, 2, 0, 0, 32, 32, 8, 255
            )
            screen = struct.pack("<I", 0x3A5) + b"\0" * 36
            body = fixed + vendor + b"\0" + b"\1\1\x20\0\0\0\0\0" * 2 + screen
            conn.sendall(struct.pack("<BBHHH", 1, 0, 11, 0, len(body) // 4) + body)
            request = conn.recv(24)
            assert request[0] == 98 and request[8:24] == b"MIT-SCREEN-SAVER"
            conn.sendall(struct.pack("<BxHIBBBB20x", 1, 1, 0, self.extension, 144, 0, 0))
            if self.extension:
                opcode, minor, _length, root = struct.unpack("<BBHI", conn.recv(8))
                assert (opcode, minor, root) == (144, 1, 0x3A5)
                conn.sendall(struct.pack("<BBHIIIIIB7x", 1, 0, 2, 0, 0, 0, self.idle_ms, 0, 0))

    def close(self) -> None:
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def x_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setattr(vma, "X11_SOCKET_DIR", str(tmp_path))
    yield tmp_path


@pytest.mark.parametrize(("extension", "expected"), [(True, 4321), (False, None)])
def test_the_agent_reads_the_idle_time_from_the_x_server(x_dir: Path, extension: bool, expected: int | None) -> None:
    server = FakeXServer(x_dir / "X3", idle_ms=4321, extension=extension)
    try:
        assert vma.x_input_idle_ms(":3", timeout=5) == expected
    finally:
        server.close()


@pytest.mark.usefixtures("x_dir")
def test_no_display_socket_is_an_error_the_session_turns_into_unknown() -> None:
    with pytest.raises(OSError):
        vma.x_input_idle_ms(":9", timeout=1)
    session = vma.XSession(vma.Children())
    session.state = "listening"
    assert session.input_idle_ms() is None


def test_the_desktop_list_shows_how_long_a_user_has_been_idle_or_away() -> None:
    now = dt.datetime.now(dt.UTC)
    idle = Desktop(id=1, state="running", idle_since=now - dt.timedelta(minutes=12, seconds=1))
    away = Desktop(id=2, state="running", disconnected_since=now - dt.timedelta(hours=2, minutes=5, seconds=1))
    assert [(r["idle"], r["disconnected"]) for r in map(table_row, (idle, away))] == [("12m", None), (None, "2h05m")]
