"""NX time to desktop for QVD's clients (issue 13): connect request → the session drawn on the client's X display.

A real all-in-one farm (``deckard.testing.FarmProcess``, LXC, the minimal image with nxagent), and the client side
QVD's client runs: Debian's ``nxproxy -S`` on an ``Xvfb`` of this process, spliced onto the broker's TLS stream
after the ``101`` (``deckard.testing_nx.NxViewer``).  "Drawn" is the session's background colour (the minimal
session's ``xsetroot``) showing on the Xvfb, polled with ``xwd`` every 50 ms (so figures carry up to ~50 ms of
polling).  Three cases, ``--runs`` times each but the first:

1. a stopped desktop: the container starts, then nxagent (once: a cold start);
2. a running desktop without a session: nxagent and the session start (the user logged out before each run);
3. a running desktop whose session is suspended (its client dropped): nxagent resumes it (SIGHUP).

Target: ≤ 1.5 s for 2 and 3.  Not measured yet: bytes on the wire and frame rate of a scripted workload over NX
against VNC (docs/benchmarks.md says so).

Usage: ``.venv/bin/python bench/nx.py [--runs 5]`` (root; LXC; apt-get install nxproxy xvfb x11-apps).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time

from deckard.testing import FarmProcess, wait_for
from deckard.testing_nx import NxViewer, nx_unavailable_reason

PASSWORD = "bench-pw1"
BACKGROUND = bytes.fromhex("2e4a62")
PARAMS = {"qvd.client.link": "lan", "qvd.client.geometry": "1024x768", "qvd.client.keyboard": "pc105/us"}


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
        desk = int(farm.user_with_desktop("nxbench", PASSWORD, "nx-bench")["id"])

        async def measure() -> dict[str, list[float]]:
            out: dict[str, list[float]] = {"cold": [], "fresh": [], "resume": []}
            async with NxViewer() as viewer:
                out["cold"].append(await time_to_drawn(farm, viewer, desk))
                for _ in range(args.runs):
                    await asyncio.to_thread(suspended, farm, desk)
                    out["resume"].append(await time_to_drawn(farm, viewer, desk))
                for _ in range(args.runs):
                    await asyncio.to_thread(logout, farm, desk)
                    out["fresh"].append(await time_to_drawn(farm, viewer, desk))
            return out

        results = asyncio.run(measure())
    finally:
        farm.close()
    print(f"# {platform.node()}, {args.runs} runs, nxproxy -S on Xvfb through the TLS broker, minimal image")
    labels = {
        "cold": "stopped desktop (container + nxagent start)",
        "fresh": "running desktop, new NX session",
        "resume": "running desktop, suspended session resumed",
    }
    for key, label in labels.items():
        runs = results[key]
        figures = ", ".join(f"{r:.2f}" for r in runs)
        print(f"{label:<46} median {statistics.median(runs):.2f} s  (runs: {figures})")


if __name__ == "__main__":
    main()
