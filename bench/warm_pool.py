"""Warm pools (issue 16 part 2): connect → desktop when a warm guest is taken over, against a cold start, same run.

Runs a real all-in-one farm (``deckard.testing.FarmProcess``) with the ``minimal`` image, gives the default OSF a
warm pool of one guest (``deckard pool set default --size 1``) and then, ``--runs`` times for a *stopped* desktop:

1. waits until the pool has a ready guest again (the node replaces a taken one at once),
2. connect request → first RFB byte through the broker (QVD protocol, TLS, login included), with the broker's
   phases (auth, claim, start = the take-over, agent, display),
3. stops the desktop;

then the same ``--runs`` times to the first frame the desktop has drawn (not one flat colour: a warm guest's shell,
JWM's taskbar, is drawn before anyone connects), the same again to the user's own first window (the session's
xterm, started at the take-over: a tenth of the screen white), and, with the pool deleted, the cold start of the
same desktop for reference.  Target: connect → drawn desktop ≤ 0.05 s from a pool.

Usage: ``.venv/bin/python bench/warm_pool.py [--runs 10] [--json]`` (root; LXC).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from deckard.client.rfb import colour_share
from deckard.runtime.process import run
from deckard.testing import FarmProcess, wait_for
from time_to_desktop import PASSWORD, PHASES, first_byte, last_connection, until_drawn, wait_state

WHITE = (255, 255, 255)  # xterm's background; the desktop and JWM's taskbar are dark


def has_window(pixels: bytes) -> bool:
    return colour_share(pixels, WHITE) > 0.1  # the session's 80x24 xterm is ~15 % of a 1280x800 screen


async def until_window(farm: FarmProcess, login: str, desktop_id: int) -> float:
    """Connect request → the user's own first window drawn (the session's xterm)."""
    return await until_drawn(farm, login, desktop_id, has_window)


def pool_ready(farm: FarmProcess) -> bool:
    items = json.loads(farm.deckard("pool", "list", "--json").stdout)
    items = items["items"] if isinstance(items, dict) else items
    return bool(items) and items[0]["ready"] >= 1


def stats(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "runs": len(values),
    }


def runs_of(
    farm: FarmProcess, desk_id: int, runs: int, measure: object, warm: bool
) -> tuple[list[float], dict[str, float]]:
    totals: list[float] = []
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(runs):
        if warm:
            wait_for(lambda: pool_ready(farm), 120, 0.05, "a ready warm guest")
        totals.append(run(measure(farm, "bench", desk_id)))  # type: ignore[operator]
        row = run(last_connection(farm))
        for p in PHASES:
            if row.get(p) is not None:
                phases[p].append(row[p])
        farm.deckard("desktop", "stop", "bench-desk")
        wait_state(farm, "bench-desk", "stopped")
    return totals, {p: round(statistics.median(v), 1) for p, v in phases.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    farm = FarmProcess()
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()} cpus={os.cpu_count()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        farm.up()
        desk_id = farm.user_with_desktop("bench", PASSWORD, "bench-desk")["id"]
        run(first_byte(farm, "bench", desk_id))  # the farm's first connect pays its own warm-up
        farm.deckard("desktop", "stop", "bench-desk")
        wait_state(farm, "bench-desk", "stopped")
        farm.deckard("pool", "set", "default", "--size", "1")
        warm, warm_phases = runs_of(farm, desk_id, args.runs, first_byte, True)
        drawn, _ = runs_of(farm, desk_id, args.runs, until_drawn, True)
        window, _ = runs_of(farm, desk_id, args.runs, until_window, True)
        farm.deckard("pool", "delete", "default")
        cold, cold_phases = runs_of(farm, desk_id, args.runs, first_byte, False)
        results.update(
            warm_first_byte_s=stats(warm),
            warm_phases_median_ms=warm_phases,
            warm_drawn_s=stats(drawn),
            warm_user_window_s=stats(window),
            cold_first_byte_s=stats(cold),
            cold_phases_median_ms=cold_phases,
        )
    finally:
        farm.close()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"machine: {results['machine']}  date: {results['date']}")
    for key, what in (
        ("warm_first_byte_s", "warm pool: connect → first RFB byte"),
        ("warm_drawn_s", "warm pool: connect → drawn desktop"),
        ("warm_user_window_s", "warm pool: connect → the user's first window (xterm)"),
        ("cold_first_byte_s", "cold start: connect → first RFB byte"),
    ):
        s = results[key]
        assert isinstance(s, dict)
        print(f"{what}: median {s['median']} s (min {s['min']}, max {s['max']}, {s['runs']} runs)")
    print(f"warm phases (median ms): {results['warm_phases_median_ms']}")
    print(f"cold phases (median ms): {results['cold_phases_median_ms']}")
    warm_drawn = results["warm_drawn_s"]
    assert isinstance(warm_drawn, dict)
    print(f"target: connect → drawn desktop ≤ 0.05 s from a warm pool: {warm_drawn['median']} s")


if __name__ == "__main__":
    main()
