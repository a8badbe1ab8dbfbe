"""Soak: ten users streaming full screens through the broker on one busy node, then the same with a database stall.

Issue 9: with ten users streaming and both CPUs busy, one slow heartbeat made the all-in-one node fence itself
and kill every desktop, and the farm process grew from 145 to 234 MB.  This runs a real all-in-one farm
(``deckard.testing.FarmProcess``, real LXC desktops, SQLite as ``deckard up`` uses by default) and, for each of
two phases of ``--minutes``:

* ``--users`` users (10) each hold a broker tunnel to their own desktop and ask for the whole screen again and
  again (RFB non-incremental FramebufferUpdateRequest, raw encoding: the heaviest stream a viewer can ask for);
* ``nproc`` busy-loop processes keep every CPU saturated for the whole phase;
* phase 2 also stalls the database for 5 s in the middle: another connection holds ``BEGIN EXCLUSIVE``.

Printed per phase: desktops lost (not running at the end, or restarted), tunnels dropped, the farm process's RSS
at the start of the phase (after a 20 s warm-up of the streams, so that the relay's buffers are at their working
size) and at its end, and its growth (the RSS before the viewers connect is printed too), the heartbeat write latency
(p50/p99/max from the node's per-minute ``node.heartbeat_stats`` lines: p50 is the median of the minutes'
medians, p99 the worst minute's p99), the loop lag of the node, and self-fencing events.
Targets: 0 desktops lost, 0 tunnels dropped, RSS growth ≤ 10 %.

``--tracemalloc`` starts the farm with tracemalloc on and prints the allocation sites that grew most during each
phase (a ``sitecustomize`` dumps a snapshot on SIGUSR2): slower, for finding a leak, not for the figures.

Usage: ``.venv/bin/python bench/soak.py [--minutes 10] [--users 10] [--json] [--tracemalloc]`` (root; LXC).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deckard.client import broker as qvd
from deckard.client.rfb import ENCODING_RAW, handshake
from deckard.testing import FarmProcess, wait_for

PASSWORD = "bench-pass"
WARMUP_S = 20.0
STALL_S = 5.0

SITECUSTOMIZE = """
import os, signal, tracemalloc
def _dump(signum, frame):
    tracemalloc.take_snapshot().dump(os.environ["DECKARD_SOAK_SNAPSHOT"] + f".{os.getpid()}")
with open("/proc/self/cmdline", "rb") as f:
    args = f.read().split(b"\\0")
serving = b"--foreground" in args  # the farm process only (`up --foreground`), not every CLI call
if serving and os.environ.get("DECKARD_SOAK_SNAPSHOT"):
    tracemalloc.start(25)
    signal.signal(signal.SIGUSR2, _dump)
"""


# ---------------------------------------------------------------- the viewers


@dataclass
class Viewer:
    """One user's tunnel: full-screen raw updates, requested again as soon as the last one arrived."""

    login: str
    desktop_id: int
    frames: int = 0
    bytes: int = 0
    dropped: str = ""

    async def stream(self, farm: FarmProcess, stop: asyncio.Event) -> None:
        try:
            reader, writer = await qvd.connect(farm.broker, self.login, PASSWORD, farm.ca, self.desktop_id)
        except Exception as e:
            self.dropped = f"connect: {type(e).__name__}: {e}"
            return
        try:
            width, height, _ = await handshake(reader, writer)
            fmt = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
            writer.write(b"\x00\x00\x00\x00" + fmt + struct.pack(">BxHi", 2, 1, ENCODING_RAW))
            while not stop.is_set():
                writer.write(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))  # non-incremental: all of it
                await writer.drain()
                self.bytes += await read_update(reader, width * height)
                self.frames += 1
        except Exception as e:
            self.dropped = f"{type(e).__name__}: {e}"
        finally:
            writer.close()


async def read_update(reader: asyncio.StreamReader, pixels: int) -> int:
    """Read server messages until ``pixels`` pixels of raw rectangles arrived; return the bytes read."""
    covered = total = 0
    while covered < pixels:
        (msg_type,) = struct.unpack(">B", await reader.readexactly(1))
        if msg_type == 0:
            (nrects,) = struct.unpack(">xH", await reader.readexactly(3))
            for _ in range(nrects):
                _x, _y, w, h, encoding = struct.unpack(">HHHHi", await reader.readexactly(12))
                if encoding != ENCODING_RAW:
                    raise RuntimeError(f"server sent encoding {encoding}")
                await reader.readexactly(w * h * 4)
                covered += w * h
                total += w * h * 4
        elif msg_type == 2:  # Bell
            continue
        elif msg_type == 3:  # ServerCutText
            await reader.readexactly(3)
            (length,) = struct.unpack(">I", await reader.readexactly(4))
            await reader.readexactly(length)
        else:
            raise RuntimeError(f"unexpected server message {msg_type}")
    return total


# ---------------------------------------------------------------- measuring


async def start_desktops(farm: FarmProcess, users: dict[str, int]) -> None:
    """Each user's first connect starts the desktop and the X session (before the CPUs are saturated)."""

    async def first_byte(login: str, desktop_id: int) -> None:
        reader, writer = await qvd.connect(farm.broker, login, PASSWORD, farm.ca, desktop_id)
        await reader.readexactly(1)
        writer.close()

    await asyncio.gather(*(first_byte(login, did) for login, did in users.items()))


def desktops(farm: FarmProcess, users: dict[str, int]) -> list[dict[str, Any]]:
    rows = farm.json("desktop", "list")
    assert isinstance(rows, list)
    return [d for d in rows if d["id"] in users.values()]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def log_events(farm: FarmProcess, since: int) -> list[dict[str, Any]]:
    """The farm's JSON log lines written after byte offset ``since``."""
    path = farm.home / "logs" / "deckard.log"
    with path.open("rb") as f:
        f.seek(since)
        data = f.read()
    events = []
    for line in data.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def log_size(farm: FarmProcess) -> int:
    path = farm.home / "logs" / "deckard.log"
    return path.stat().st_size if path.exists() else 0


def busy_loops() -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(os.cpu_count() or 1)
    ]


def stall_database(path: Path, seconds: float) -> None:
    """Hold SQLite's write lock from another connection, as a long admin transaction or a backup would."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


@dataclass
class Phase:
    name: str
    stall: bool
    figures: dict[str, Any] = field(default_factory=dict)


def snapshot(pid: int, base: Path, label: str) -> Path | None:
    os.kill(pid, signal.SIGUSR2)
    path = Path(f"{base}.{pid}")
    with contextlib.suppress(AssertionError):
        wait_for(lambda: path.exists() and path.stat().st_size > 0, 60, 0.5, "snapshot")
        time.sleep(2)  # let the dump finish
        return path.rename(f"{base}.{label}")
    return None


def run_phase(farm: FarmProcess, phase: Phase, users: dict[str, int], minutes: float, snap_base: Path | None) -> None:
    pid = farm.pid()
    assert pid is not None
    started = {d["id"]: d["started_at"] for d in desktops(farm, users)}
    viewers = [Viewer(login, did) for login, did in users.items()]
    spinners = busy_loops()
    stop = asyncio.Event()
    stall: threading.Thread | None = None
    out = phase.figures
    try:

        async def run() -> None:
            nonlocal stall
            out["rss_idle_mb"] = round(rss_mb(pid), 1)  # desktops running, nobody streaming
            tasks = [asyncio.create_task(v.stream(farm, stop)) for v in viewers]
            await asyncio.sleep(WARMUP_S)
            out["rss_start_mb"] = round(rss_mb(pid), 1)
            out["log_from"] = log_size(farm)
            snaps["start"] = snapshot(pid, snap_base, f"{phase.name}.start") if snap_base else None
            frames0 = sum(v.frames for v in viewers)
            t0 = time.monotonic()
            samples = []
            duration = minutes * 60
            while (elapsed := time.monotonic() - t0) < duration:
                if phase.stall and stall is None and elapsed >= duration / 2:
                    stall = threading.Thread(target=stall_database, args=(farm.home / "deckard.db", STALL_S))
                    stall.start()
                await asyncio.sleep(min(15.0, duration - elapsed))
                samples.append(round(rss_mb(pid), 1))
            out["frames_per_s"] = round((sum(v.frames for v in viewers) - frames0) / (time.monotonic() - t0), 1)
            out["rss_end_mb"] = round(rss_mb(pid), 1)
            out["rss_samples_mb"] = samples
            snaps["end"] = snapshot(pid, snap_base, f"{phase.name}.end") if snap_base else None
            stop.set()
            await asyncio.gather(*tasks)

        snaps: dict[str, Path | None] = {}
        asyncio.run(run())
    finally:
        for p in spinners:
            p.kill()
            p.wait()
        if stall is not None:
            stall.join()
    out["rss_growth_pct"] = round((out["rss_end_mb"] - out["rss_start_mb"]) / out["rss_start_mb"] * 100, 1)
    out["tunnels_dropped"] = sum(1 for v in viewers if v.dropped)
    out["drops"] = [f"{v.login}: {v.dropped}" for v in viewers if v.dropped]
    out["gbytes_streamed"] = round(sum(v.bytes for v in viewers) / 1e9, 2)
    after = {d["id"]: d for d in desktops(farm, users)}
    lost = [i for i, d in after.items() if d["state"] != "running" or d["started_at"] != started.get(i)]
    out["desktops_lost"] = len(lost)
    events = log_events(farm, out.pop("log_from"))
    stats = [e for e in events if e.get("event") == "node.heartbeat_stats"]
    p50s = [e["p50_ms"] for e in stats if "p50_ms" in e]
    out["heartbeat_ms"] = {
        "minutes": len(stats),
        "writes": sum(e["writes"] for e in stats),
        "failed": sum(e["failed"] for e in stats),
        "p50": statistics.median(p50s) if p50s else None,
        "p99": max((e["p99_ms"] for e in stats if "p99_ms" in e), default=None),
        "max": max((e["max_ms"] for e in stats), default=None),
        "loop_lag_max": max((e["loop_lag_max_ms"] for e in stats), default=None),
    }
    out["self_fenced"] = sum(1 for e in events if e.get("event") == "node.self_fenced")
    out["heartbeat_failed"] = sum(1 for e in events if e.get("event") == "node.heartbeat_failed")
    if snaps.get("start") and snaps.get("end"):
        out["tracemalloc_top"] = top_growth(snaps["start"], snaps["end"])  # type: ignore[arg-type]


def top_growth(start: Path, end: Path, limit: int = 15) -> list[str]:
    before = tracemalloc.Snapshot.load(str(start))
    after = tracemalloc.Snapshot.load(str(end))
    return [str(s) for s in after.compare_to(before, "traceback")[:limit]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="length of each phase (default 10)")
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tracemalloc", action="store_true", help="print the allocation sites that grew (slower)")
    args = ap.parse_args()

    extra: dict[str, str] = {}
    snap_base: Path | None = None
    if args.tracemalloc:
        hook = Path(tempfile.mkdtemp(prefix="deckard-soak-"))
        (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
        snap_base = hook / "snapshot"
        extra = {
            "PYTHONPATH": str(hook),
            "DECKARD_SOAK_SNAPSHOT": str(snap_base),
        }
    farm = FarmProcess(extra_env=extra)
    phases = [Phase("streaming", stall=False), Phase("streaming + 5 s database stall", stall=True)]
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} vCPUs, kernel {platform.release()}",
        "minutes_per_phase": args.minutes,
        "users": args.users,
    }
    try:
        farm.up()
        users: dict[str, int] = {}
        for i in range(args.users):
            users[f"soak{i}"] = int(farm.user_with_desktop(f"soak{i}", PASSWORD, f"soak{i}")["id"])
        asyncio.run(start_desktops(farm, dict(list(users.items())[:1])))  # unpacks the image once
        asyncio.run(start_desktops(farm, users))
        for phase in phases:
            run_phase(farm, phase, users, args.minutes, snap_base)
            results[phase.name] = phase.figures
    finally:
        farm.close()

    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"machine: {results['machine']}; {args.users} users, {args.minutes:g} min per phase, CPUs saturated")
    for phase in phases:
        f = phase.figures
        hb = f["heartbeat_ms"]
        print(f"\n{phase.name}:")
        print(f"  desktops lost: {f['desktops_lost']}   tunnels dropped: {f['tunnels_dropped']}   targets 0 / 0")
        for drop in f["drops"]:
            print(f"    dropped {drop}")
        print(
            f"  farm RSS: {f['rss_start_mb']} MB → {f['rss_end_mb']} MB ({f['rss_growth_pct']:+.1f} %)  target ≤ 10 %"
            f"   (idle before the viewers: {f['rss_idle_mb']} MB; every 15 s: {f['rss_samples_mb']})"
        )
        print(
            f"  heartbeat write: p50 {hb['p50']} ms, p99 {hb['p99']} ms, max {hb['max']} ms "
            f"({hb['writes']} writes, {f['heartbeat_failed']} failed, {hb['minutes']} minute lines); "
            f"event-loop lag max {hb['loop_lag_max']} ms; self-fenced {f['self_fenced']} times"
        )
        print(f"  streamed {f['gbytes_streamed']} GB, {f['frames_per_s']} full frames/s over all viewers")
        for line in f.get("tracemalloc_top", []):
            print(f"    {line}")


if __name__ == "__main__":
    main()
