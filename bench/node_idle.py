"""What an all-in-one farm costs while its desktops run and nobody does anything.

A real farm (``deckard.testing.FarmProcess``: the API, a node with the container driver and the broker in one
process, SQLite) starts ``--desktops`` LXC desktops of the minimal image, waits until they run, lets them settle
for ``--settle`` seconds and then measures for ``--seconds``:

* the farm process's CPU seconds a second, its waited-for children included (the programs the node runs: the
  node's heartbeat counts the running guests every 2 s and its agent check looks at each desktop every 5 s);
* processes and threads created a second on the whole machine (from the kernel's last pid, ``/proc/loadavg``),
  the desktops' own included.

Repeated with ``--runs``; medians printed.  Idle desktops themselves are not counted in the first figure (their
processes are not the farm's children).

Usage: ``.venv/bin/python bench/node_idle.py [--desktops 10] [--seconds 30] [--runs 2] [--json]`` (root; LXC).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from deckard.testing import FarmProcess, wait_for

TICK = os.sysconf("SC_CLK_TCK")
PASSWORD = "bench-pass"


def farm_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and of its children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / TICK  # utime stime cutime cstime


def last_pid() -> int:
    return int(Path("/proc/loadavg").read_text().split()[4])


def created(before: int, after: int) -> int:
    """Pids handed out between two readings of the last pid (it wraps at ``pid_max``)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return (after - before) % pid_max


def measure(pid: int, seconds: float) -> tuple[float, float]:
    cpu0, pid0, t0 = farm_cpu(pid), last_pid(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return (farm_cpu(pid) - cpu0) / elapsed, created(pid0, last_pid()) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--desktops", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    farm = FarmProcess()
    try:
        farm.up()
        wait_for(lambda: farm.pid() is not None, 10, what="the farm's pid")
        pid = farm.pid()
        assert pid is not None
        names = [f"idle-{i}" for i in range(args.desktops)]
        for name in names:
            farm.user_with_desktop(name, PASSWORD, name)
            farm.deckard("desktop", "start", name)
        for name in names:
            wait_for(lambda n=name: farm.desktop(n)["state"] == "running", 120, 0.2, f"{name} running")
        time.sleep(args.settle)
        runs = [measure(pid, args.seconds) for _ in range(args.runs)]
        running = sum(1 for name in names if farm.desktop(name)["state"] == "running")
    finally:
        farm.close()

    cpu = statistics.median(r[0] for r in runs)
    spawned = statistics.median(r[1] for r in runs)
    result = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "desktops_running": running,
        "farm_cpu_s_per_s": round(cpu, 4),
        "farm_cpu_s_per_s_runs": [round(r[0], 4) for r in runs],
        "pids_per_s": round(spawned, 1),
        "pids_per_s_runs": [round(r[1], 1) for r in runs],
        "seconds": args.seconds,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"idle farm with {running} running desktops, {args.runs} runs of {args.seconds:g} s:")
    print(f"  farm process CPU (children included): {cpu:.3f} s/s  (runs: {result['farm_cpu_s_per_s_runs']})")
    print(f"  processes/threads created on the machine: {spawned:.1f}/s  (runs: {result['pids_per_s_runs']})")


if __name__ == "__main__":
    main()
