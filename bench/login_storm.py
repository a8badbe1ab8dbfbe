"""A login storm: N users connect to their stopped desktops at the same moment (the 9 o'clock rush on one node).

Runs a real all-in-one farm (``deckard.testing.FarmProcess``) with N users, each with a container desktop, and
connects them all at once through the broker, twice:

1. **first logins**: every password checked with argon2 (nobody logged in before), every desktop's first start
   (its layer and home made);
2. **again**, after all were stopped: the logins confirmed a moment ago (``auth.local.remember_s``), cold starts.

Each round reports connect request → first RFB byte per user (median, p95, max), the wall time until the last
user's first byte, and the farm process's CPU time per connect (its broker, node and database in one process).
Beside them, in the same run, **the floor**: N bare containers of the same unpacked image (as in
``time_to_desktop.py``: the same overlay, user namespace and bridge, no Deckard) started at once, ``lxc-start`` →
RFB banner; the report gives each round's median and last first byte over the floor's.

Usage: ``.venv/bin/python bench/login_storm.py [--users 20] [--json]`` (root; LXC).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deckard.runtime.process import run
from deckard.testing import FarmProcess
from time_to_desktop import PASSWORD, first_byte, floor_runner, wait_state


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def figures(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median": round(statistics.median(ordered), 3),
        "p95": round(ordered[max(0, round(0.95 * len(ordered)) - 1)], 3),
        "max": round(ordered[-1], 3),
    }


def storm(farm: FarmProcess, pid: int, users: dict[str, int]) -> dict[str, object]:
    async def all_at_once() -> list[float]:
        return await asyncio.gather(*(first_byte(farm, login, desk) for login, desk in users.items()))

    cpu0, t0 = process_cpu_s(pid), time.perf_counter()
    samples = run(all_at_once())
    wall, cpu = time.perf_counter() - t0, process_cpu_s(pid) - cpu0
    return {**figures(samples), "wall_s": round(wall, 3), "farm_cpu_ms_per_connect": round(cpu / len(users) * 1000)}


def floor_storm(farm: FarmProcess, n: int) -> dict[str, float]:
    runners = [floor_runner(farm, slot=i) for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        totals = [whole for _started, whole in pool.map(lambda once: once(), runners)]
    return figures(totals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    farm = FarmProcess()
    results: dict[str, object] = {"machine": f"{platform.node()} {platform.machine()} cpus={os.cpu_count()}"}
    try:
        farm.up()
        pid = farm.pid()
        assert pid is not None, "the farm wrote no pid file"
        users = {}
        for i in range(args.users):
            farm.deckard("user", "add", f"storm{i}", "--password", PASSWORD)
            farm.deckard("desktop", "add", f"storm{i}-desk", "--user", f"storm{i}")
            users[f"storm{i}"] = farm.desktop(f"storm{i}-desk")["id"]
        time.sleep(2)  # the farm settles after the adds
        for round_ in ("first_logins", "again"):
            results[round_] = storm(farm, pid, users)
            for i in range(args.users):
                farm.deckard("desktop", "stop", f"storm{i}-desk")
            for i in range(args.users):
                wait_state(farm, f"storm{i}-desk", "stopped")
            time.sleep(2)
        results["floor"] = floor_storm(farm, args.users)
    finally:
        farm.close()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    floor = results["floor"]
    assert isinstance(floor, dict)
    print(f"machine: {results['machine']}  users: {args.users}, all at once")
    print(f"floor, {args.users} bare containers at once (lxc-start → RFB banner): {floor}")
    for round_ in ("first_logins", "again"):
        r = results[round_]
        assert isinstance(r, dict)
        print(
            f"{round_.replace('_', ' ')}: first RFB byte median {r['median']} s, p95 {r['p95']} s, last {r['max']} s "
            f"({r['median'] / floor['median']:.2f}x / {r['max'] / floor['max']:.2f}x the floor's); "
            f"farm CPU {r['farm_cpu_ms_per_connect']} ms per connect"
        )


if __name__ == "__main__":
    main()
