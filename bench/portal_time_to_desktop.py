"""Portal time to desktop: click on *Connect* → first desktop frame drawn in the page, for a stopped desktop.

What the user of the browser client waits for, measured in the page itself (``window.deckardTiming``, set by
``web/src/portal.js``): the click, the ticket request to the API, the broker's WebSocket, the container start,
the display, noVNC's handshake and the first framebuffer update painted on the canvas.  Before every run the
desktop is stopped through the CLI, so each run is a cold container start (the image is unpacked once, in a
warm-up run that is not counted).  Target: median ≤ 2 s.

Runs a real all-in-one farm (``deckard.testing.FarmProcess``) and Debian's Chromium through Playwright.

Usage: ``.venv/bin/python bench/portal_time_to_desktop.py [--runs 7] [--json]`` (root; LXC; chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from typing import Any

from playwright.sync_api import sync_playwright

from deckard.testing import CHROMIUM, CHROMIUM_ARGS, FarmProcess, wait_for

PASSWORD = "bench-pass1"


def wait_stopped(farm: FarmProcess, name: str) -> None:
    wait_for(
        lambda: (d := farm.desktop(name))["state"] == "stopped" and d["cmd"] is None,
        90,
        0.3,
        f"{name} to stop",
    )


def one_run(page: Any, base: str) -> dict[str, float]:
    """Open the portal (already logged in), click Connect, wait for the first frame; returns the page timings."""
    page.goto(base + "/")
    page.get_by_role("button", name="Connect to bench-desk").click()
    page.wait_for_function("document.body.dataset.firstFrame", timeout=90_000)
    t: dict[str, float] = page.evaluate("window.deckardTiming")
    page.get_by_role("button", name="Disconnect").click()
    return {
        "first_frame_s": (t["firstFrame"] - t["click"]) / 1000,
        "rfb_connected_s": (t["connected"] - t["click"]) / 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    farm = FarmProcess()
    results: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()} cpus={os.cpu_count()}"}
    try:
        farm.up()
        farm.user_with_desktop("bench", PASSWORD, "bench-desk")
        base = f"https://127.0.0.1:{farm.api_port}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
            page = ctx.new_page()
            page.goto(base + "/")
            page.get_by_label("User name").fill("bench")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.get_by_role("button", name="Connect to bench-desk").wait_for()
            one_run(page, base)  # warm-up: unpacks the image, first Xvnc start in a fresh overlay
            runs = []
            for _ in range(args.runs):
                farm.deckard("desktop", "stop", "bench-desk")
                wait_stopped(farm, "bench-desk")
                runs.append(one_run(page, base))
            browser.close()
        first = [r["first_frame_s"] for r in runs]
        results["portal_time_to_desktop_s"] = {
            "median": round(statistics.median(first), 3),
            "min": round(min(first), 3),
            "max": round(max(first), 3),
            "runs": len(first),
            "rfb_connected_median": round(statistics.median(r["rfb_connected_s"] for r in runs), 3),
        }
    finally:
        farm.close()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    r = results["portal_time_to_desktop_s"]
    print(f"machine: {results['machine']}")
    print(
        f"portal click → first frame drawn (stopped desktop): median {r['median']:.2f} s "
        f"(min {r['min']:.2f}, max {r['max']:.2f}, {r['runs']} runs)  target ≤ 2 s"
    )
    print(f"  of which click → noVNC connected: median {r['rfb_connected_median']:.2f} s")


if __name__ == "__main__":
    main()
