"""NX for QVD's clients, the pure parts: the client's options (broker and agent), nxproxy's first fields with the
desktop's cookie put in, and the X state QVD derives from nxagent's log."""

from __future__ import annotations

import struct

import pytest

from deckard.broker.nx import NxClientHandshake, NxHandshakeError, NxOptions, display_of, parse_nx_options
from deckard.broker.params import parse_connect_params
from deckard.drivers.display import nx_cookie
from deckard.model.errors import BadInput
from deckard.vma import agent as vma

# what QVD's Linux client sends (reference/qvd.md §8), with a time zone
QVD_CLIENT = {
    "qvd.client.os": "linux",
    "qvd.client.keyboard": "pc105/es",
    "qvd.client.link": "adsl",
    "qvd.client.geometry": "1024x768",
    "qvd.client.fullscreen": "",
    "qvd.client.nxagent.extra_args": "",
    "qvd.client.printing.enabled": "1",
    "qvd.client.usb.enabled": "0",
    "qvd.client.usb.implementation": "USBIP",
    "qvd.client.audio.compression.enable": "1",
    "qvd.client.timezone": "Europe/Madrid",
}

# nxagent's log of a session started, connected, dropped by its client, resumed and connected again
NXAGENT_LOG = """\
NXAGENT - Version 3.5.99.26
Session: Starting session at 'Tue Dec  1 05:19:14 2026'.
Info: Proxy running in client mode with pid '12705'.
Info: Waiting for connection from any host on socket 'tcp:*:4100'.
Info: Connection with remote proxy completed.
Session: Session started at 'Tue Dec  1 05:19:16 2026'.
Info: Screen [0] resized to geometry [1024x768] fullscreen [0].
Session: Display failure detected at 'Tue Dec  1 05:19:30 2026'.
Session: Suspending session at 'Tue Dec  1 05:19:30 2026'.
Session: Session suspended at 'Tue Dec  1 05:19:31 2026'.
Info: Waiting for connection from any host on socket 'tcp:*:4100'.
Session: Session resumed at 'Tue Dec  1 05:19:43 2026'.
"""


def test_qvd_clients_settings_become_nxagent_options() -> None:
    opts = parse_nx_options(QVD_CLIENT)
    assert opts == NxOptions("1024x768", "pc105/es", "adsl", False, "linux", "Europe/Madrid", (), printing=True)
    assert opts.agent_params() == {
        "nx_keyboard": "pc105/es",
        "nx_link": "adsl",
        "nx_fullscreen": "0",
        "nx_client": "linux",
        "timezone": "Europe/Madrid",
    }


def test_printing_is_asked_for_with_qvds_slave_flavour_and_allowed_by_the_farm() -> None:
    opts = parse_nx_options(QVD_CLIENT)
    assert opts.agent_params(printing=True)["nx_printing"] == "1"
    assert "nx_printing" not in opts.agent_params(printing=False)  # nx.printing.enabled off
    for flavour in ("ipp", "cups"):  # QVD's older flavours ride on channels Deckard does not open
        assert not parse_nx_options({**QVD_CLIENT, "qvd.client.printing.flavor": flavour}).printing
    assert not parse_nx_options({**QVD_CLIENT, "qvd.client.printing.enabled": "0"}).printing
    assert vma.parse_nx_params(opts.agent_params(printing=True))["printing"] is True


def test_a_client_that_sends_nothing_gets_qvds_defaults() -> None:
    assert parse_nx_options({}) == NxOptions(None, "pc105/us", "adsl", False, "linux", None, ())


@pytest.mark.parametrize(
    ("os", "keyboard", "nx_client", "nx_keyboard"),
    [
        ("windows", "pc105/es", "windows", "pc105/es"),  # QVD's Perl client on Windows
        ("unknown", "pc105/en", "linux", "pc105/en"),  # the Perl client on another system
        ("winnt", "empty/empty", "windows", "pc105/us"),  # the Qt client on Windows, no layout detected
        ("freebsd", "/us", "linux", "pc105/us"),  # the Qt client when X names no keyboard model
        ("darwin", "pc105/latam", "macosx", "pc105/latam"),
    ],
)
def test_what_qvds_perl_and_qt_clients_send_is_accepted(
    os: str, keyboard: str, nx_client: str, nx_keyboard: str
) -> None:
    qt = {"qvd.client.type": "qt", "qvd.client.audio.sound.enable": "1", "qvd.client.audio.microphone.enable": "0"}
    opts = parse_nx_options({**QVD_CLIENT, **qt, "qvd.client.os": os, "qvd.client.keyboard": keyboard})
    assert (opts.client, opts.keyboard) == (nx_client, nx_keyboard)
    assert vma.parse_nx_params(opts.agent_params())["keyboard"] == nx_keyboard  # and the agent agrees


def test_allowed_extra_args_pass_with_checked_values() -> None:
    opts = parse_nx_options({"qvd.client.nxagent.extra_args": "-dpi 96 -norender", "qvd.client.fullscreen": "1"})
    assert opts.extra_args == ("-dpi", "96", "-norender") and opts.fullscreen
    assert opts.agent_params()["nx_extra"] == "-dpi 96 -norender"


@pytest.mark.parametrize(
    ("name", "value", "code"),
    [
        ("qvd.client.link", "fast; reboot", "bad_nx_option"),
        ("qvd.client.fullscreen", "yes", "bad_nx_option"),
        ("qvd.client.os", "plan 9;", "bad_nx_option"),
        ("qvd.client.timezone", "../../etc/shadow", "bad_nx_option"),
        ("qvd.client.timezone", "Europe/Madrid;id", "bad_nx_option"),
        ("qvd.client.nxagent.extra_args", "-display :0", "bad_nx_option"),
        ("qvd.client.nxagent.extra_args", "-dpi $(id)", "bad_nx_option"),
        ("qvd.client.nxagent.extra_args", "-dpi", "bad_nx_option"),
        ("qvd.client.nxagent.extra_args", "-norender " * 40, "bad_nx_option"),
        ("qvd.client.keyboard", "pc105/us,cookie=x", "bad_keyboard"),
        ("qvd.client.geometry", "1024x768,listen=1", "bad_geometry"),
        ("qvd.client.frobnicate", "1", "unsupported_client_parameter"),
    ],
)
def test_bad_nx_options_are_refused_with_a_code(name: str, value: str, code: str) -> None:
    with pytest.raises(BadInput) as e:
        parse_nx_options({**QVD_CLIENT, name: value})
    assert e.value.code == code


def test_the_connect_parses_nx_options_only_for_nx() -> None:
    pairs = [("id", "7"), ("qvd.client.link", "warp")]
    assert parse_connect_params(pairs, "vnc").nx is None  # a VNC client's qvd.client.link is only logged
    with pytest.raises(BadInput):
        parse_connect_params(pairs, "nx")
    params = parse_connect_params([("id", "7"), ("qvd.client.link", "lan")], "nx")
    assert params.display == "nx" and params.nx is not None and params.nx.link == "lan"


def test_the_display_header_says_vnc_or_nx_and_defaults_to_nx() -> None:
    assert display_of(None) == "nx"
    assert display_of(" VNC ") == "vnc"
    with pytest.raises(BadInput) as e:
        display_of("rdp")
    assert e.value.code == "bad_display_protocol"


# ---------------------------------------------------------------- nxproxy's first fields


def test_the_broker_puts_the_desktops_cookie_into_nxproxys_options() -> None:
    hs = NxClientHandshake("c0ffee")
    assert hs.feed(b"NXPROXY-3.5.0-3.5.99") == (b"", b"")
    assert hs.feed(b".26 stream=default,da") == (b"", b"")
    to_client, to_desktop = hs.feed(b"ta=default \x01\x02")
    assert to_client == b""
    assert to_desktop == b"NXPROXY-3.5.0-3.5.99.26 cookie=c0ffee,stream=default,data=default \x01\x02"
    assert hs.done and hs.feed(b"more") == (b"", b"more")


def test_a_cookie_the_client_sends_is_replaced_not_passed_on() -> None:
    hs = NxClientHandshake("right")
    _, to_desktop = hs.feed(b"NXPROXY-3.5.0-3.5.99.26 cookie=guess,stream=default,data=default ")
    assert to_desktop == b"NXPROXY-3.5.0-3.5.99.26 cookie=right,stream=default,data=default "


@pytest.mark.parametrize(
    "first", [b"RFB 003.008\n", b"GET / HTTP/1.1\r\n", b"NXPROXY-3.5;rm -rf / x ", b"NXPROXY-" + b"9" * 2000]
)
def test_what_is_not_nxproxy_never_reaches_nxagent(first: bytes) -> None:
    with pytest.raises(NxHandshakeError):
        NxClientHandshake("c").feed(first)


# ---------------------------------------------------------------- the agent's side


def test_agent_and_broker_derive_the_same_cookie() -> None:
    assert vma.nx_cookie("token-1") == nx_cookie("token-1")
    assert len(nx_cookie("token-1")) == 32 and nx_cookie("token-1") != nx_cookie("token-2")


def test_the_agent_writes_checked_options_into_nxagents_options_file() -> None:
    opts = vma.parse_nx_params(
        {"nx_keyboard": "pc105/es", "nx_link": "lan", "nx_fullscreen": "1", "nx_client": "windows", "nx_extra": "-r"}
    )
    assert opts["extra"] == ["-r"]
    line = vma.nx_options_line(opts, "1024x768", "ab" * 16)
    assert line == (
        "nx/nx,link=lan,keyboard=pc105/es,client=windows,geometry=1024x768,fullscreen=1,"
        f"cookie={'ab' * 16},tolerancechecks=risky,media=1,slave=1,listen=4100:100\n"
    )


@pytest.mark.parametrize(
    "params",
    [
        {"nx_keyboard": "pc105/us,listen=1"},
        {"nx_link": "adsl,accept=10.0.0.1"},
        {"nx_fullscreen": "2"},
        {"nx_client": "beos"},
        {"timezone": "../../x"},
        {"nx_extra": "-auth /etc/shadow"},
        {"nx_extra": "-dpi 1e9"},
    ],
)
def test_the_agent_refuses_what_the_broker_should_have_refused(params: dict[str, str]) -> None:
    with pytest.raises(vma.AgentError) as e:
        vma.parse_nx_params(params)
    assert e.value.code == "bad_nx_option"


def test_x_states_come_from_nxagents_log_as_qvd_derives_them() -> None:
    lines = NXAGENT_LOG.splitlines()
    seen = [vma.nx_state_from_log("\n".join(lines[: i + 1])) for i in range(len(lines))]
    assert seen == [
        None,
        "starting",
        "starting",
        "listening",
        "listening",
        "connected",
        "connected",
        "suspending",
        "suspending",
        "suspended",
        "listening",
        "connected",
    ]
    assert vma.nx_state_from_log("Session: Terminating session at 'x'.\n") == "stopping"
    assert vma.nx_state_from_log("Session: Aborting session at 'x'.\nSession: Session aborted at 'x'.") == "stopped"


def test_the_xauthority_entry_is_what_xauth_writes() -> None:
    entry = vma.xauthority_entry(256, b"desk", b"100", bytes(16))
    family, n = struct.unpack_from(">HH", entry)
    assert (family, entry[4 : 4 + n]) == (256, b"desk")
    assert entry.endswith(struct.pack(">H", 16) + bytes(16)) and b"MIT-MAGIC-COOKIE-1" in entry


def test_a_proxy_connected_before_nxagent_says_so_keeps_the_new_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """The listening timeout stops a new NX session nobody connected to; a client's proxy holding a connection to
    nxagent's port counts even before nxagent's log says "Session started" (a shadow session on a loaded machine)."""
    session = vma.NxSession(vma.Children(), "t0ken")
    ports: list[int] = []

    def connected(port: int) -> bool:
        ports.append(port)
        return port == vma.NX_PORT and len(ports) > 1

    monkeypatch.setattr(vma, "vnc_connected", connected)
    assert not session._proxy_connected()  # nobody yet: the timeout may stop it
    assert session._proxy_connected() and session.connected_once
    assert ports == [vma.NX_PORT, vma.NX_PORT]


def test_a_session_whose_log_says_it_ended_is_not_the_display_any_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """A logout ends nxagent's session: its log says so before its process is gone and before the watcher's next
    pass; meanwhile a VNC connect must get a new Xvnc session, not a refusal (``display_busy``)."""
    agent = vma.Agent("t0ken", is_init=False)
    nx = agent.nx
    nx.state, nx.user = "listening", "nxuser"
    stopped: list[bool] = []
    monkeypatch.setattr(nx, "server_alive", lambda: True)
    monkeypatch.setattr(nx, "stop", lambda: (stopped.append(True), setattr(nx, "state", "stopped")))
    monkeypatch.setattr(nx, "nx_state", lambda: "suspended")
    assert agent.active() is nx and not stopped  # a suspended session stays the display
    monkeypatch.setattr(nx, "nx_state", lambda: "stopped")
    assert agent.active() is agent.x and stopped == [True]
