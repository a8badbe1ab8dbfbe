"""Session policies on a real farm: an LXC desktop whose user goes idle is warned on its display (Xvnc's own idle
time, read by the agent), input postpones the action, and the desktop is stopped; then a desktop whose client
disconnects is stopped on time; the user's home survives both.

Short policies (seconds) keep the test quick: two desktop starts, about half a minute.
"""

from __future__ import annotations

import asyncio
import struct
import time

import pytest

from deckard.client import broker as qvd
from deckard.client.rfb import handshake
from deckard.runtime.paths import FarmPaths
from deckard.testing import FarmProcess, wait_for

pytestmark = pytest.mark.e2e
SHARED_FARM = True  # tests/e2e/conftest.py: users and desktops of its own names, no farm-wide change kept

PASSWORD = "s3cret!"
IDLE_S, WARN_S, AWAY_S = 8, 4, 3
# a node notices a connection at its next pass (every 5 s) and acts within a pass; the CLI polls take ~1 s
LATE_S = 6


def _notice(farm: FarmProcess, desktop_id: int) -> str:
    """The text of the notice on the desktop's display ("" while there is none)."""
    every_command = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done 2>/dev/null"
    out = farm.attach(desktop_id, f"{every_command} | grep '^xmessage' || true")  # the image has no ps
    return out.stdout.strip()


async def _idle_session(farm: FarmProcess, desktop_id: int) -> tuple[float, float, str]:
    """Connect, keep still until the idle notice shows, move the mouse once, then keep still until the desktop is
    stopped (the tunnel closes).  Returns (seconds from the input to the stop, from the connect, the notice)."""
    reader, writer = await qvd.connect(farm.broker, "ivy", PASSWORD, farm.ca, desktop_id)
    try:
        width, height, _ = await handshake(reader, writer)
        connected = time.monotonic()
        assert (await asyncio.to_thread(farm.attach, desktop_id, "echo kept > ~/kept.txt", "ivy")).returncode == 0
        notice = await asyncio.to_thread(
            wait_for, lambda: _notice(farm, desktop_id), WARN_S + LATE_S, 0.5, "the idle notice"
        )
        assert time.monotonic() - connected >= IDLE_S - WARN_S - 0.5
        idle = await asyncio.to_thread(farm.json, "desktop", "list", "--idle-for", "3s")
        assert [d["name"] for d in idle] == ["ivy-desk"], idle  # type: ignore[union-attr]
        writer.write(struct.pack(">BBHH", 5, 0, width // 3, height // 3))  # RFB PointerEvent: the user is back
        await writer.drain()
        moved = time.monotonic()
        assert await asyncio.wait_for(reader.read(), IDLE_S + LATE_S + 5) == b""  # the stop closes the tunnel
        return time.monotonic() - moved, time.monotonic() - connected, notice
    finally:
        writer.close()


def test_idle_and_disconnect_policies_stop_a_real_desktop_on_time_and_keep_its_home(farm: FarmProcess) -> None:
    farm.deckard("user", "add", "ivy", "--password", PASSWORD)
    farm.deckard("desktop", "add", "ivy-desk", "--user", "ivy")
    desk = farm.desktop("ivy-desk")
    policies = {
        "session.idle_after_s": IDLE_S,
        "session.idle_warn_s": WARN_S,
        "session.idle_action": "stop",
        "session.stop_after_disconnect_s": AWAY_S,
    }
    for key, value in policies.items():
        farm.deckard("config", "set", key, str(value))
    try:
        since_input, since_connect, notice = asyncio.run(_idle_session(farm, desk["id"]))
        assert "stopped in" in notice and "Save your work" in notice, notice
        # the input cancelled the first notice: the stop comes a whole idle time after it, not after the connect
        assert IDLE_S - 0.5 <= since_input <= IDLE_S + LATE_S, (since_input, since_connect)
        stopped = wait_for(lambda: (d := farm.desktop("ivy-desk"))["state"] == "stopped" and d, 15, 0.3, "stopped")
        assert stopped["failure_reason"].startswith("session policy (idle): "), stopped  # type: ignore[index]

        async def second_session() -> float:
            reader, writer = await qvd.connect(farm.broker, "ivy", PASSWORD, farm.ca, desk["id"])
            await handshake(reader, writer)
            home = await asyncio.to_thread(farm.attach, desk["id"], "cat ~/kept.txt", "ivy")
            assert home.stdout.strip() == "kept", home  # the idle stop kept the home
            writer.close()
            return time.monotonic()

        left = asyncio.run(second_session())
        stopped = wait_for(
            lambda: (d := farm.desktop("ivy-desk"))["state"] == "stopped" and d, AWAY_S + LATE_S, 0.2, "stopped"
        )
        assert time.monotonic() - left >= AWAY_S
        assert stopped["failure_reason"].startswith("session policy (disconnected): "), stopped  # type: ignore[index]
        homes = list((FarmPaths(farm.home).homes / "default").glob("ivy+*/kept.txt"))
        assert [h.read_text() for h in homes] == ["kept\n"]
        audit = farm.json("audit", "list", "-f", "object_id=" + str(desk["id"]), "-f", "action=desktop.stop")
        assert {r["admin_name"] for r in audit} == {"session-policy"}, audit  # type: ignore[union-attr]
    finally:
        for key in policies:
            farm.deckard("config", "reset", key, check=False)
