"""NX time to desktop for QVD's clients (issue 13): connect request → the session drawn on the client's X display.

A real all-in-one farm (``deckard.testing.FarmProcess``, LXC, the minimal image with nxagent), and the client side
QVD's client runs: Debian's ``nxproxy -S`` on an ``Xvfb`` of this process, spliced onto the broker's TLS stream
after the ``101`` (``deckard.testing_nx.NxViewer``).  "Drawn" is the session's background colour (the minimal
session's ``xsetroot``) showing on the Xvfb, polled with ``xwd`` every 50 ms (so figures carry up to ~50 ms of
polling).  Three cases, ``--runs`` times each but the first:

1. a stopped desktop: the container starts, then nxagent (once: a cold start);
2. a running desktop without a session: nxagent and the session start (the user logged out before each run);
3. a running desktop whose session is suspended (its client dropped): nxagent resumes it (SIGHUP).

Then the sessions moving between kinds of client (docs/clients.md, "One session, whatever the client"):

4. a suspended NX session shown to a VNC client (the agent's Xvnc and local nxproxy): connect → a drawn frame;
5. an Xvnc session shown to a QVD client (nxagent's shadow of it): connect → the session drawn on the Xvfb.

Target: ≤ 1.5 s for 2 and 3.

Last, one scripted workload over NX and over VNC in the same run, each on its own kind of session: a terminal
(xterm, 100x40) scrolling a line every 10 ms for 10 s.  For each: the bytes the broker sent the client (inside TLS)
and the frame rate, counted the same way on both sides: the client's X display (Xvfb: nxproxy for NX, TigerVNC's
viewer for VNC) is read with ``xwd`` as fast as it goes and the distinct pictures counted, so the figure is capped
by that sampling (printed beside it).  NX runs with QVD's default link (``adsl``) and with ``lan``; the VNC viewer
with its defaults (automatic encoding).

Usage: ``.venv/bin/python bench/nx.py [--runs 5]`` (root; LXC; apt-get install nxproxy xvfb x11-apps; the VNC
viewer, tigervnc-viewer, is installed from apt the first time).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from deckard.client import broker as qvd
from deckard.client.rfb import grab_framebuffer, is_blank
from deckard.testing import FarmProcess, wait_for
from deckard.testing_nx import NxViewer, nx_unavailable_reason, pump, xwd_pixels

PASSWORD = "bench-pw1"
BACKGROUND = bytes.fromhex("2e4a62")
PARAMS = {"qvd.client.link": "lan", "qvd.client.geometry": "1024x768", "qvd.client.keyboard": "pc105/us"}
WORKLOAD_S = 10.0
# a line every 10 ms, for a little longer than the measurement
SCROLL = (
    "i=0; while [ $i -lt 1500 ]; do i=$((i+1));"
    ' echo "line $i: the quick brown fox jumps over the lazy dog"; sleep 0.01; done'
)


async def time_to_drawn(farm: FarmProcess, viewer: NxViewer, desk: int) -> float:
    t0 = time.monotonic()
    await viewer.connect(farm.broker, farm.ca, "nxbench", PASSWORD, desk, PARAMS)
    await viewer.wait_drawn(BACKGROUND, 60)
    took = time.monotonic() - t0
    await viewer.disconnect()
    return took


def logout(farm: FarmProcess, desk: int) -> None:
    farm.attach(desk, "kill -KILL -1", "nxbench")
    every = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done 2>/dev/null"
    wait_for(lambda: "nxagent" not in farm.attach(desk, every).stdout, 15, 0.2, "the session to end")
    time.sleep(0.6)  # the agent's watcher marks the display stopped within half a second


def suspended(farm: FarmProcess, desk: int) -> None:
    wait_for(
        lambda: "Session suspended" in farm.attach(desk, "tail -n 2 /run/deckard/nxagent.log").stdout,
        15,
        0.1,
        "nxagent to suspend",
    )


async def vnc_time_to_drawn(farm: FarmProcess, desk: int) -> float:
    """deckard connect's path: connect (VNC) → a frame that is not blank."""
    t0 = time.monotonic()
    reader, writer = await qvd.connect(farm.broker, "nxbench", PASSWORD, farm.ca, desk)
    try:
        _, _, pixels = await asyncio.wait_for(grab_framebuffer(reader, writer, until_drawn=30), 60)
        if is_blank(pixels):
            raise RuntimeError("the VNC client saw a blank screen")
        return time.monotonic() - t0
    finally:
        writer.close()


def screens_per_second(display: int, seconds: float) -> tuple[float, float]:
    """Distinct pictures of ``:display`` seen per second, reading it with xwd as fast as it goes; and how many
    times a second it was read (the most the first figure can be)."""
    seen, reads, last, end = 0, 0, b"", time.monotonic() + seconds
    while time.monotonic() < end:
        digest = hashlib.blake2b(xwd_pixels(display)[2], digest_size=16).digest()
        seen += digest != last
        reads += 1
        last = digest
    return seen / seconds, reads / seconds


def scroll(farm: FarmProcess, desk: int, display: str) -> None:
    """Start the scrolling terminal on the session's display, as the user."""
    auth = "XAUTHORITY=/run/deckard/nx/xauthority " if display == ":100" else ""
    term = f"DISPLAY={display} {auth}setsid xterm -geometry 100x40+0+0 -e sh -c '{SCROLL}' >/dev/null 2>&1 &"
    farm.attach(desk, term, "nxbench")


async def nx_workload(farm: FarmProcess, desk: int, link: str) -> dict[str, float]:
    await asyncio.to_thread(logout, farm, desk)
    async with NxViewer() as viewer:
        await viewer.connect(farm.broker, farm.ca, "nxbench", PASSWORD, desk, {**PARAMS, "qvd.client.link": link})
        await viewer.wait_drawn(BACKGROUND, 60)
        await asyncio.sleep(1.0)  # the session's start drawn and sent
        await asyncio.to_thread(scroll, farm, desk, ":100")
        await asyncio.sleep(0.5)
        before = viewer.bytes_down[0]
        fps, reads = await asyncio.to_thread(screens_per_second, viewer.display, WORKLOAD_S)
        sent = viewer.bytes_down[0] - before
        await viewer.disconnect()
    return {"kb_s": sent / WORKLOAD_S / 1000, "fps": fps, "reads": reads}


def vnc_viewer() -> str:
    path = shutil.which("xtigervncviewer")
    if path is None:
        print("nx bench: installing tigervnc-viewer (apt)", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "tigervnc-viewer"], check=True, stdout=subprocess.DEVNULL)
        path = shutil.which("xtigervncviewer")
    assert path is not None
    return path


def start_viewer(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def vnc_workload(farm: FarmProcess, desk: int, viewer_binary: str) -> dict[str, float]:
    """TigerVNC's viewer on an Xvfb, through a local relay (counting) onto the broker's tunnel."""
    await asyncio.to_thread(logout, farm, desk)
    reader, writer = await qvd.connect(farm.broker, "nxbench", PASSWORD, farm.ca, desk)
    down = [0]
    pumps: list[asyncio.Task[None]] = []

    def on_viewer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        pumps.extend([asyncio.create_task(pump(reader, w, down)), asyncio.create_task(pump(r, writer, [0]))])

    server = await asyncio.start_server(on_viewer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with NxViewer() as screen:  # only its Xvfb: the VNC viewer draws there
        env = {**os.environ, "DISPLAY": f":{screen.display}", "HOME": str(screen.home)}
        viewer = start_viewer([viewer_binary, "-SecurityTypes", "None", "-geometry", "+0+0", f"127.0.0.1::{port}"], env)
        try:
            await screen.wait_drawn(BACKGROUND, 60)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(scroll, farm, desk, ":0")
            await asyncio.sleep(0.5)
            before = down[0]
            fps, reads = await asyncio.to_thread(screens_per_second, screen.display, WORKLOAD_S)
            sent = down[0] - before
        finally:
            viewer.terminate()
            viewer.wait(5)
            server.close()
            writer.close()
            for task in pumps:
                task.cancel()
    return {"kb_s": sent / WORKLOAD_S / 1000, "fps": fps, "reads": reads}


def agent_memory(farm: FarmProcess, desk: int) -> dict[str, dict[str, int]]:
    """The desktop's agent (its init) and the mounter it forked (vma/shares.py), read from the host (the mounter is
    not dumpable: nothing in the desktop may read it): RSS, PSS and private dirty memory, KiB."""
    lxc, name = farm.guest_of(desk)
    info = subprocess.run(["lxc-info", "-P", str(lxc), "-n", name, "-pH"], capture_output=True, text=True, check=True)
    init = int(info.stdout.strip())
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    mounters = [
        int(c)
        for c in children
        if Path(f"/proc/{c}/cmdline").read_bytes() == Path(f"/proc/{init}/cmdline").read_bytes()
    ]

    def figures(pid: int) -> dict[str, int]:
        rollup = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        return {key: int(rollup[key].split()[0]) for key in ("Rss", "Pss", "Private_Dirty")}

    return {"agent": figures(init), **({"mounter": figures(mounters[0])} if mounters else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    reason = nx_unavailable_reason()
    if reason:
        raise SystemExit(reason)
    farm = FarmProcess()
    try:
        farm.up()
        farm.deckard("config", "set", "nx.shares.in_containers", "true")  # the mounter's memory is measured too
        desk = int(farm.user_with_desktop("nxbench", PASSWORD, "nx-bench")["id"])

        async def measure() -> dict[str, list[float]]:
            out: dict[str, list[float]] = {"cold": [], "fresh": [], "resume": [], "view": [], "shadow": []}
            async with NxViewer() as viewer:
                out["cold"].append(await time_to_drawn(farm, viewer, desk))
                for _ in range(args.runs):
                    await asyncio.to_thread(suspended, farm, desk)
                    out["resume"].append(await time_to_drawn(farm, viewer, desk))
                for _ in range(args.runs):
                    await asyncio.to_thread(suspended, farm, desk)
                    out["view"].append(await vnc_time_to_drawn(farm, desk))
                    await time_to_drawn(farm, viewer, desk)  # the QVD client takes it back
                for _ in range(args.runs):
                    await asyncio.to_thread(logout, farm, desk)
                    out["fresh"].append(await time_to_drawn(farm, viewer, desk))
                for _ in range(args.runs):
                    await asyncio.to_thread(logout, farm, desk)
                    await vnc_time_to_drawn(farm, desk)  # an Xvnc session, its client gone
                    out["shadow"].append(await time_to_drawn(farm, viewer, desk))
            return out

        async def workloads() -> dict[str, dict[str, float]]:
            viewer_binary = await asyncio.to_thread(vnc_viewer)
            return {
                "NX (link adsl, QVD's default)": await nx_workload(farm, desk, "adsl"),
                "NX (link lan)": await nx_workload(farm, desk, "lan"),
                "VNC (TigerVNC viewer, automatic encoding)": await vnc_workload(farm, desk, viewer_binary),
            }

        results = asyncio.run(measure())
        loads = asyncio.run(workloads())
        memory = agent_memory(farm, desk)
    finally:
        farm.close()
    print(f"# {platform.node()}, {args.runs} runs, nxproxy -S on Xvfb through the TLS broker, minimal image")
    labels = {
        "cold": "stopped desktop (container + nxagent start)",
        "fresh": "running desktop, new NX session",
        "resume": "running desktop, suspended session resumed",
        "view": "suspended NX session shown to a VNC client",
        "shadow": "Xvnc session shown to a QVD client (shadow)",
    }
    for key, label in labels.items():
        runs = results[key]
        figures = ", ".join(f"{r:.2f}" for r in runs)
        print(f"{label:<46} median {statistics.median(runs):.2f} s  (runs: {figures})")
    print(f"# a terminal scrolling a line every 10 ms for {WORKLOAD_S:g} s, bytes the broker sent inside TLS")
    for name, load in loads.items():
        reads = f"of {load['reads']:.1f} reads/s"
        print(f"{name:<46} {load['kb_s']:8.1f} kB/s   {load['fps']:5.1f} distinct screens/s ({reads})")
    print("# the desktop's agent and its mounter of shared folders, KiB")
    for who, kib in memory.items():
        print(f"{who:<46} RSS {kib['Rss']:6d}  PSS {kib['Pss']:6d}  private dirty {kib['Private_Dirty']:6d}")


if __name__ == "__main__":
    main()
