"""QVD's clients on a real farm: Debian's ``nxproxy`` through the broker, as QVD's client wires it, draws the LXC
desktop's session (nxagent inside) on an ``Xvfb`` of the test's own.

One desktop for the module: a picture, bad options refused while the session goes on, a VNC client refused while
the NX session is in use, the client dropped and the session resumed with its windows, a client gone right after
the ``101``, and a VNC client once the NX session has ended.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from deckard.client import broker as qvd
from deckard.client.agent import AgentClient
from deckard.client.rfb import grab_framebuffer, is_blank
from deckard.model.errors import BadInput, Unavailable
from deckard.testing import FarmProcess, wait_for
from deckard.testing_nx import NxViewer, colours, nx_unavailable_reason

pytestmark = pytest.mark.e2e
SHARED_FARM = True  # tests/e2e/conftest.py: users and desktops of its own names, no farm-wide change kept

PASSWORD = "s3cret!"
BACKGROUND = bytes.fromhex("2e4a62")  # the minimal session's xsetroot colour (images/profiles/minimal/xsession)
QVD_PARAMS = {
    "qvd.client.os": "linux",
    "qvd.client.keyboard": "pc105/es",
    "qvd.client.link": "lan",
    "qvd.client.geometry": "1024x768",
    "qvd.client.fullscreen": "",
    "qvd.client.nxagent.extra_args": "",
    "qvd.client.printing.enabled": "0",
    "qvd.client.timezone": "Europe/Madrid",
}
# every process's command line in the desktop (the image has no ps), with its owner
PROCESSES = "for p in /proc/[0-9]*; do echo \"$(stat -c %U $p) $(tr '\\0' ' ' < $p/cmdline)\"; done 2>/dev/null"


@pytest.fixture(scope="module")
def desk(farm: FarmProcess) -> int:
    reason = nx_unavailable_reason()
    if reason:
        pytest.skip(reason)
    farm.deckard("user", "add", "nxuser", "--password", PASSWORD)
    farm.deckard("desktop", "add", "nx-desk", "--user", "nxuser")
    return int(farm.desktop("nx-desk")["id"])


def _user_state(farm: FarmProcess, state: str, timeout: float = 15) -> None:
    wait_for(lambda: farm.desktop("nx-desk")["user_state"] == state, timeout, 0.2, f"user_state {state}")


async def _drawn(farm: FarmProcess, viewer: NxViewer, desk: int, tries: int = 1) -> float:
    t0 = time.monotonic()
    for attempt in range(tries):
        await viewer.connect(farm.broker, farm.ca, "nxuser", PASSWORD, desk, QVD_PARAMS)
        try:
            await viewer.wait_drawn(BACKGROUND, 30 if attempt == tries - 1 else 15)
            return time.monotonic() - t0
        except TimeoutError:
            if attempt == tries - 1:
                pytest.fail(f"not drawn\n{viewer.log()}\n{farm.diagnostics(desk)}")
        # a resume that failed (nxagent: "Display failure detected" as it reattaches, seen once in CI on a loaded
        # machine) leaves the session suspended again, windows kept: a QVD client's user connects again
        await viewer.disconnect()
        _suspended(farm, desk)
    raise AssertionError("unreachable")


def _suspended(farm: FarmProcess, desk: int) -> None:
    wait_for(
        lambda: "Session suspended" in farm.attach(desk, "tail -n 3 /run/deckard/nxagent.log").stdout,
        15,
        0.2,
        "nxagent to suspend",
    )


def test_nxproxy_draws_the_session_and_resumes_it_after_the_client_drops(farm: FarmProcess, desk: int) -> None:
    async def scenario() -> None:
        async with NxViewer() as viewer:
            await _drawn(farm, viewer, desk)  # the desktop starts on this connect
            _, _, px = viewer.pixels()
            assert len(colours(px)) >= 3, "the session drew nothing but its background"
            _user_state(farm, "connected")
            owners = {
                line.split()[0]
                for line in farm.attach(desk, PROCESSES).stdout.splitlines()
                if " nxagent " in f" {line} " and line.split()[1:2] == ["nxagent"]
            }
            assert owners == {"nxuser"}, owners  # never root
            environ = "for p in /proc/[0-9]*; do tr '\\0' '\\n' < $p/environ; done 2>/dev/null"
            tz = farm.attach(desk, environ, "nxuser")  # root in a desktop may not read the user's processes
            assert "TZ=Europe/Madrid" in tz.stdout
            # the agent reports the NX display's state and the user's idle time (nxagent wants the cookie for that)
            token = farm.attach(desk, "cat /etc/deckard/agent-token").stdout.strip()
            agent = AgentClient(farm.desktop("nx-desk")["ip"], token)
            idle = await agent.call("idle")
            assert (idle["state"], isinstance(idle["idle_ms"], int)) == ("connected", True), idle
            assert (await agent.call("x_state"))["protocol"] == "nx"

            # bad options: a code, and the session carries on
            with pytest.raises(BadInput) as bad:
                conn = await qvd.BrokerConnection.open(farm.broker, farm.ca)
                try:
                    await conn.connect(
                        "nxuser", PASSWORD, desk, params={"qvd.client.nxagent.extra_args": "-display :0"}, display="nx"
                    )
                finally:
                    await conn.close()
            assert bad.value.details["error"] == "bad_nx_option"
            # a VNC client while the NX session is in use: refused, the NX client keeps its session
            with pytest.raises(Unavailable) as busy:
                await qvd.connect(farm.broker, "nxuser", PASSWORD, farm.ca, desk)
            assert busy.value.details["error"] == "display_in_use_by_other_protocol"
            assert farm.desktop("nx-desk")["user_state"] == "connected"

            # a window of the session, then the client drops: nxagent suspends the session, windows kept
            window = "DISPLAY=:100 XAUTHORITY=/run/deckard/nx/xauthority setsid xterm -title kept >/dev/null 2>&1 &"
            assert farm.attach(desk, window, "nxuser").returncode == 0
            await viewer.disconnect()
            _user_state(farm, "disconnected")
            _suspended(farm, desk)
            await _drawn(farm, viewer, desk, tries=2)  # resumed, not restarted
            log = farm.attach(desk, "cat /run/deckard/nxagent.log").stdout
            assert log.count("Session: Starting session at") == 1 and "Session: Session resumed at" in log
            assert "xterm -title kept" in farm.attach(desk, PROCESSES).stdout  # the window lived through it
            await viewer.disconnect()

    asyncio.run(scenario())


def test_a_client_gone_right_after_the_101_leaves_the_desktop_running_and_its_session_kept(
    farm: FarmProcess, desk: int
) -> None:
    """The session suspended by the previous test is resumed for a client that leaves before nxproxy speaks: the
    broker never dialled nxagent (which aborts a session whose proxy leaves mid-negotiation), and the next client
    gets the same windows."""

    async def scenario() -> None:
        conn = await qvd.BrokerConnection.open(farm.broker, farm.ca)
        await conn.connect("nxuser", PASSWORD, desk, params=QVD_PARAMS, display="nx")
        await conn.close()  # before nxproxy said a word
        _user_state(farm, "disconnected")
        assert farm.desktop("nx-desk")["state"] == "running"
        async with NxViewer() as viewer:
            await _drawn(farm, viewer, desk, tries=2)
            await viewer.disconnect()
        log = farm.attach(desk, "cat /run/deckard/nxagent.log").stdout
        assert log.count("Session: Starting session at") == 1 and "Aborting" not in log, log
        assert "xterm -title kept" in farm.attach(desk, PROCESSES).stdout

    asyncio.run(scenario())


def test_a_vnc_client_works_once_the_nx_session_has_ended(farm: FarmProcess, desk: int) -> None:
    farm.attach(desk, "kill -TERM -1", "nxuser")  # the user's processes end: a logout, nxagent included
    wait_for(
        lambda: " nxagent " not in farm.attach(desk, PROCESSES).stdout.replace("\n", " \n"), 15, 0.3, "nxagent gone"
    )

    async def see() -> None:
        reader, writer = await qvd.connect(farm.broker, "nxuser", PASSWORD, farm.ca, desk)
        try:
            _, _, pixels = await asyncio.wait_for(grab_framebuffer(reader, writer, until_drawn=15), 30)
            assert not is_blank(pixels)
        finally:
            writer.close()

    asyncio.run(see())
