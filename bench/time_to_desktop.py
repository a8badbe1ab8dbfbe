"""Time to desktop, idle desktop memory and 20 desktops at once on one node (issue: single-node farm).

Runs a real all-in-one farm (``deckard.testing.FarmProcess``: its own home, ports, bridge) with the image of
``--profile`` (``minimal``: Xvnc + JWM + xterm; ``standard``: Xfce + Firefox ESR), then:

0. ``deckard up`` (the image cached, unpacked before the farm says it is ready) and the very first desktop after
   it: connect request → first RFB byte (before images were unpacked ahead, this one paid for the unpacking); a
   new user's, on a farm just up; ``--first`` farms in all (3; one sample a farm, so the ratio is their median);
1. time to desktop: for a *stopped* desktop, connect request → first RFB byte through the broker, N times,
   with the phases the broker records (auth, claim, container start, agent ready, display ready), and 3 times
   until the first frame the session has drawn (not one flat colour), and that for 3 new users' first login
   (a new home: what the session's programs set up once per user, e.g. caches, is in it);
2. memory of an idle desktop: the whole container's memory cgroup (usage and RSS) once the session has been
   up and idle for ``--idle`` seconds;
3. 20 desktops started and connected at once on one node: wall time, all framebuffers non-blank, memory.

Beside 1, in the same run, **the floor**: a bare container of the same unpacked image (the same overlay, user
namespace and bridge, none of Deckard: no agent, no broker, no database) whose init starts Xvnc and JWM; ``lxc-start``
→ the RFB banner read from its address, N times, each just before a cold start, with the desktop stopped (so
a machine that slows down or speeds up during the run moves both alike).  The report gives Deckard's time over the
floor's, and each of the broker's phases as a share of the floor (issue 16: cold ≤ 1.5x the floor, the first
connect after ``up`` ≤ 2x).

``--vm`` measures VM desktops instead (an OSF with ``--driver vm``, the profile built with ``--format vm``):
0. the VM image prepared by the node (rootfs → ext4 qcow2, kernel, initrd), once;
1. time to desktop for a *stopped* VM desktop (boot included), connect request → first RFB byte, N times,
   and until the session's first drawn frame; target ≤ 8 s under TCG, ≤ 2 s with KVM;
2. host memory of an idle VM desktop: QEMU's RSS against the guest's RAM (target ≤ guest RAM + 100 MiB).
``--accel kvm|tcg`` forces the accelerator (default: KVM when a real probe shows it works, as the node does):
on a machine whose KVM runs stock kernels, ``--vm --accel kvm`` gives the KVM figure.

Usage: ``.venv/bin/python bench/time_to_desktop.py [--profile standard] [--runs 10] [--desktops 20]`` (root; LXC)
       ``.venv/bin/python bench/time_to_desktop.py --vm [--runs 5] [--memory 1024] [--accel kvm]`` (root; QEMU).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from deckard.client import broker as qvd
from deckard.client.rfb import grab_framebuffer, is_blank
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.drivers.lxc_config import ID_RANGE, farm_id_base
from deckard.images.profile import builtin_profiles
from deckard.runtime.paths import FarmPaths
from deckard.runtime.process import run  # the loop deckard connect runs on: Deckard's connects and the floor's
from deckard.testing import FarmProcess, wait_for

PASSWORD = "bench-pass"
PHASES = ["t_auth_ms", "t_claim_ms", "t_start_ms", "t_agent_ms", "t_display_ms", "t_total_ms"]
MEMORY_TARGET_MIB = {"minimal": 120, "standard": 250}


def cgroup_memory(guest: str) -> tuple[int, int]:
    """The guest's memory charge and its private + mapped part, on a v1 memory hierarchy or on pure cgroup2."""
    base = Path("/sys/fs/cgroup/memory") / f"lxc.payload.{guest}"
    if base.is_dir():
        usage = int((base / "memory.usage_in_bytes").read_text())
        stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
        return usage, int(stat.get("total_rss", 0)) + int(stat.get("total_mapped_file", 0))
    base = Path("/sys/fs/cgroup") / f"lxc.payload.{guest}"
    stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
    return int((base / "memory.current").read_text()), int(stat.get("anon", 0)) + int(stat.get("file_mapped", 0))


def median_of(seconds: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(seconds), 3), "runs": len(seconds)}


def wait_state(farm: FarmProcess, name: str, state: str) -> None:
    wait_for(lambda: (d := farm.desktop(name))["state"] == state and d["cmd"] is None, 60, 0.1, state)


async def first_byte(farm: FarmProcess, login: str, desktop_id: int) -> float:
    t0 = time.perf_counter()
    reader, writer = await qvd.connect(farm.broker, login, PASSWORD, farm.ca, desktop_id)
    await reader.readexactly(1)
    elapsed = time.perf_counter() - t0
    writer.close()
    return elapsed


async def last_connection(farm: FarmProcess) -> dict[str, Any]:
    """The last connection's row once its phases are in (the broker writes them just after the ``101``)."""
    db = Database(farm.sqlite_url)
    await db.start(run_migrations=False)
    try:
        for _ in range(100):
            async with db.connect() as conn:
                q = sa.select(t.connections).order_by(t.connections.c.id.desc()).limit(1)
                row = dict((await conn.execute(q)).one()._mapping)
            if row.get("t_total_ms") is not None:
                break
            await asyncio.sleep(0.01)
        return row
    finally:
        await db.close()


def not_blank(pixels: bytes) -> bool:
    return not is_blank(pixels)


async def until_drawn(
    farm: FarmProcess, login: str, desktop_id: int, drawn: Callable[[bytes], bool] = not_blank
) -> float:
    """Connect request → the first frame that is not one flat colour (the session has drawn something), or that
    ``drawn`` accepts: until the update that made it was read, not until the viewer's check of it (~5 ms of
    Python for a 1280x800 frame, which a real viewer does not do)."""
    t0 = time.perf_counter()
    reader, writer = await qvd.connect(farm.broker, login, PASSWORD, farm.ca, desktop_id)
    try:
        received: list[float] = []
        grab = grab_framebuffer(reader, writer, until_drawn=30, drawn=drawn, received=received)
        _w, _h, pixels = await asyncio.wait_for(grab, 60)
        assert drawn(pixels), "the desktop was not drawn within 30 s"
        return received[-1] - t0
    finally:
        writer.close()


async def see(farm: FarmProcess, login: str, desktop_id: int) -> bool:
    reader, writer = await qvd.connect(farm.broker, login, PASSWORD, farm.ca, desktop_id)
    try:
        _w, _h, pixels = await asyncio.wait_for(grab_framebuffer(reader, writer, until_drawn=15), 60)
        return not is_blank(pixels)
    finally:
        writer.close()


FLOOR_INIT = """#!/bin/sh
Xvnc :0 -rfbport 5900 -SecurityTypes None -geometry 1280x800 -depth 24 -nolisten tcp {glx}>/dev/null 2>&1 &
until [ -e /tmp/.X11-unix/X0 ]; do sleep 0.01; done
DISPLAY=:0 exec jwm
"""


def floor_config(name: str, basefs: Path, upper: Path, id_base: int, farm: FarmProcess, ip: str) -> str:
    """A bare unprivileged container of the farm's unpacked image: Deckard's overlay, id map and bridge, nothing
    else of it (LXC's defaults for the rest)."""
    net = ipaddress.ip_network(farm.network)
    return "\n".join(
        [
            f"lxc.uts.name = {name}",
            f"lxc.rootfs.path = overlay:{basefs}:{upper}",
            "lxc.init.cmd = /floor.sh",
            f"lxc.idmap = u 0 {id_base} {ID_RANGE}",
            f"lxc.idmap = g 0 {id_base} {ID_RANGE}",
            "lxc.autodev = 1",
            "lxc.mount.auto = proc:mixed sys:ro",
            "lxc.net.0.type = veth",
            f"lxc.net.0.link = {farm.bridge}",
            "lxc.net.0.flags = up",
            f"lxc.net.0.ipv4.address = {ip}/{net.prefixlen}",
            f"lxc.net.0.ipv4.gateway = {next(net.hosts())}",
            "",
        ]
    )


async def banner(ip: str, deadline: float) -> None:
    """Connect to ip:5900 until Xvnc answers with its 12-byte RFB banner."""
    while True:
        try:
            reader, writer = await asyncio.open_connection(ip, 5900)
        except OSError:
            if time.perf_counter() > deadline:
                raise TimeoutError("the floor's Xvnc never listened") from None
            await asyncio.sleep(0.002)
            continue
        try:
            left = max(1.0, deadline - time.perf_counter())  # many at once (login_storm.py): Xvnc may be slow
            if (await asyncio.wait_for(reader.readexactly(12), left)).startswith(b"RFB "):
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the port was up before Xvnc answered: again
        finally:
            writer.close()


_NEIGH_FLUSH = threading.Lock()


def floor_runner(farm: FarmProcess, *, glx: bool = True, slot: int = 0) -> Callable[[], tuple[float, float]]:
    """The floor, one run per call: ``lxc-start`` of the bare container → the RFB banner through the bridge;
    returns (``lxc-start``'s own time, the whole).  Its Xvnc has OpenGL as the farm's desktops have (``glx``).
    Runners of different ``slot`` may run at once (their own address and names)."""
    paths = FarmPaths(farm.home)
    id_base = farm_id_base(paths.farm_id)
    (basefs,) = sorted(paths.basefs.glob(f"*-u{id_base}"))[-1:]
    ip = str(list(ipaddress.ip_network(farm.network).hosts())[-2 - slot])  # far from the desktops this run makes
    lxc = Path(farm.home) / "floor-lxc"
    runs = itertools.count()

    def once() -> tuple[float, float]:
        name = f"floor{os.getpid() % 100000}-{slot}-{next(runs)}"
        work = lxc / name
        upper = work / "upper"
        upper.mkdir(parents=True)
        (upper / "floor.sh").write_text(FLOOR_INIT.format(glx="" if glx else "-extension GLX "))
        (upper / "floor.sh").chmod(0o755)
        for path in (work, upper, upper / "floor.sh"):
            os.chown(path, id_base, id_base)
        config = work / "config"
        config.write_text(floor_config(name, basefs, upper, id_base, farm, ip))
        with _NEIGH_FLUSH:  # a flush beside another's dump is cut short ("Dump was interrupted"): one at a time
            subprocess.run(["ip", "neigh", "flush", "to", ip], check=False, capture_output=True)
        try:
            t0 = time.perf_counter()
            subprocess.run(["lxc-start", "-n", name, "-P", str(lxc), "-f", str(config), "-d"], check=True)
            started = time.perf_counter() - t0
            run(banner(ip, t0 + 30))
            return started, time.perf_counter() - t0
        finally:
            subprocess.run(["lxc-stop", "-n", name, "-P", str(lxc), "-k"], check=False, capture_output=True)
            shutil.rmtree(work, ignore_errors=True)

    return once


def floor_figures(samples: list[tuple[float, float]]) -> dict[str, object]:
    started, totals = [s for s, _ in samples], [w for _, w in samples]
    return {
        "floor_s": {"median": round(statistics.median(totals), 3), "min": round(min(totals), 3), "runs": len(totals)},
        "floor_lxc_start_ms": round(statistics.median(started) * 1000, 1),
    }


def cold_starts(
    farm: FarmProcess, name: str, desk_id: int, runs: int, before: Callable[[], object] = lambda: None
) -> dict[str, object]:
    """Stop the desktop and connect again, ``runs`` times: connect → first RFB byte, and the broker's phases;
    ``before`` runs before each connect, once the desktop has stopped (the floor's runs: each on a machine as
    quiet as the connect that follows it, and as it is then)."""
    totals: list[float] = []
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(runs):
        farm.deckard("desktop", "stop", name)
        wait_state(farm, name, "stopped")
        before()
        totals.append(run(first_byte(farm, "bench", desk_id)))
        row = run(last_connection(farm))
        for p in PHASES:
            if row.get(p) is not None:
                phases[p].append(row[p])
    return {
        "time_to_desktop_s": {
            "median": round(statistics.median(totals), 3),
            "min": round(min(totals), 3),
            "max": round(max(totals), 3),
            "runs": len(totals),
        },
        "phases_median_ms": {p: round(statistics.median(v), 1) for p, v in phases.items() if v},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--desktops", type=int, default=20)
    ap.add_argument("--first", type=int, default=3, help="farms brought up for the first connect after up (3)")
    ap.add_argument("--profile", default="minimal", choices=builtin_profiles(), help="image profile (minimal)")
    ap.add_argument("--idle", type=float, help="seconds the session idles before its memory is read (5; standard 20)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--vm", action="store_true", help="measure VM desktops (QEMU) instead of containers")
    ap.add_argument("--memory", type=int, default=1024, help="--vm: the guest's RAM in MiB (1024)")
    ap.add_argument("--cpus", type=int, default=1, help="--vm: the guest's vCPUs (1)")
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto", help="--vm: QEMU's accelerator")
    ap.add_argument("--no-glx", action="store_true", help="desktops (and the floor) without OpenGL: display.glx off")
    args = ap.parse_args()
    if args.vm:
        vm_main(args)
        return
    idle_s = args.idle if args.idle is not None else (20.0 if args.profile == "standard" else 5.0)

    farm = FarmProcess(extra_env={"DECKARD_IMAGE_PROFILE": args.profile})
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()} "
        f"{platform.processor() or ''} cpus={__import__('os').cpu_count()}",
        "profile": args.profile,
        "glx": not args.no_glx,
    }
    try:
        t0 = time.perf_counter()
        farm.up()
        results["up_s"] = round(time.perf_counter() - t0, 2)
        if args.no_glx:
            farm.deckard("config", "set", "display.glx", "false", "--osf", "default")
        desk_id = farm.user_with_desktop("bench", PASSWORD, "bench-desk")["id"]
        firsts = [run(first_byte(farm, "bench", desk_id))]
        row = run(last_connection(farm))
        results["first_desktop_phases_ms"] = {p: row[p] for p in PHASES if row.get(p) is not None}
        run(see(farm, "bench", desk_id))
        floor_run, floor_samples = floor_runner(farm, glx=not args.no_glx), []
        results.update(cold_starts(farm, "bench-desk", desk_id, args.runs, lambda: floor_samples.append(floor_run())))
        results.update(floor_figures(floor_samples))
        drawn = []
        for _ in range(3):
            farm.deckard("desktop", "stop", "bench-desk")
            wait_state(farm, "bench-desk", "stopped")
            drawn.append(run(until_drawn(farm, "bench", desk_id)))
        results["time_to_drawn_s"] = median_of(drawn)
        first_drawn = []
        for n in range(3):
            login = f"newcomer{n}"
            new_id = farm.user_with_desktop(login, PASSWORD, f"{login}-desk")["id"]
            first_drawn.append(run(until_drawn(farm, login, new_id)))
            farm.deckard("desktop", "stop", f"{login}-desk")
            wait_state(farm, f"{login}-desk", "stopped")
        results["new_user_drawn_s"] = median_of(first_drawn)

        run(see(farm, "bench", desk_id))
        time.sleep(idle_s)  # let the session come up and go idle
        usage, rss = cgroup_memory(FarmPaths(farm.home).guest_name(desk_id))
        results["idle_desktop_memory_mib"] = {"cgroup_usage": round(usage / 2**20, 1), "rss": round(rss / 2**20, 1)}

        if args.desktops:
            results["many_desktops"] = many_desktops(farm, args.desktops)
    finally:
        farm.close()
    for _ in range(args.first - 1):
        firsts.append(first_connect_after_up(args.profile))
    results["first_desktop_s"] = {
        "median": round(statistics.median(firsts), 3),
        "runs": [round(f, 3) for f in firsts],
    }
    finish(args, results)


def first_connect_after_up(profile: str) -> float:
    """One more farm brought up (its own home; the image from the cache) and its first connect: a new user's."""
    farm = FarmProcess(extra_env={"DECKARD_IMAGE_PROFILE": profile})
    try:
        farm.up()
        desk_id = farm.user_with_desktop("bench", PASSWORD, "bench-desk")["id"]
        return run(first_byte(farm, "bench", desk_id))
    finally:
        farm.close()


def vm_main(args: argparse.Namespace) -> None:
    from deckard.images.builder import build_image
    from deckard.images.profile import load_profile, with_vm
    from deckard.testing import image_cache

    runs = min(args.runs, 5) if args.runs == 10 else args.runs  # a TCG boot is ~8 s: 5 runs by default
    image = run(
        build_image(
            image_cache() / "built",
            cache_dir=image_cache(),
            progress=lambda _t, _f: None,
            profile=with_vm(load_profile(args.profile)),
        )
    )
    env = {"DECKARD_IMAGE_PROFILE": args.profile, "DECKARD_NODE__VM_ACCEL": args.accel}
    farm = FarmProcess(extra_env=env)
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()} cpus={__import__('os').cpu_count()}",
        "profile": args.profile,
        "memory_mib": args.memory,
        "cpus": args.cpus,
    }
    try:
        farm.up()
        farm.deckard("osf", "add", "vmbench", "--driver", "vm", "--memory", str(args.memory), "--cpus", str(args.cpus))
        t0 = time.perf_counter()
        farm.deckard("image", "import", str(image), "--osf", "vmbench")
        desk_id = farm.user_with_desktop("bench", PASSWORD, "bench-vm", "--osf", "vmbench")["id"]
        paths = FarmPaths(farm.home)
        wait_for(lambda: any(paths.basefs.glob("*-vm*/disk.qcow2")), 600, 0.2, "the VM image")
        results["image_prepared_s"] = round(time.perf_counter() - t0, 1)
        run(see(farm, "bench", desk_id))  # the first boot formats the home disk
        results.update(cold_starts(farm, "bench-vm", desk_id, runs))
        farm.deckard("desktop", "stop", "bench-vm")
        wait_state(farm, "bench-vm", "stopped")
        results["time_to_drawn_s"] = round(run(until_drawn(farm, "bench", desk_id)), 2)
        time.sleep(args.idle if args.idle is not None else 10.0)
        pid = int((paths.vm / paths.guest_name(desk_id) / "qemu.pid").read_text())
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        rss = int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) // 1024
        results["idle_qemu_rss_mib"] = rss
        results["accel"] = Path("/run/deckard-kvm-probe").read_text().strip() if args.accel == "auto" else args.accel
    finally:
        farm.close()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    ttd = results["time_to_desktop_s"]
    assert isinstance(ttd, dict)
    print(
        f"machine: {results['machine']}  profile: {results['profile']}  accelerator: {results['accel']}  "
        f"guest: {args.cpus} vCPU, {args.memory} MiB"
    )
    print(f"VM image prepared by the node: {results['image_prepared_s']} s")
    target = 2.0 if results["accel"] == "kvm" else 8.0
    print(
        f"time to VM desktop (stopped → first RFB byte, boot included): median {ttd['median']} s "
        f"(min {ttd['min']}, max {ttd['max']}, {ttd['runs']} runs)  target ≤ {target:g} s"
    )
    print(f"phases (median ms): {results['phases_median_ms']}")
    print(f"stopped → first frame the session has drawn: {results['time_to_drawn_s']} s")
    print(f"idle VM desktop: QEMU RSS {rss} MiB for {args.memory} MiB of guest RAM  target ≤ {args.memory + 100} MiB")


def many_desktops(farm: FarmProcess, n: int) -> dict[str, object]:
    """``n`` desktops started and connected at once: wall time, all framebuffers drawn, memory."""
    for i in range(n):
        farm.deckard("user", "add", f"u{i}", "--password", PASSWORD)
        farm.deckard("desktop", "add", f"d{i}", "--user", f"u{i}")
    ids = {f"u{i}": farm.desktop(f"d{i}")["id"] for i in range(n)}

    async def all_at_once() -> list[bool]:
        return await asyncio.gather(*(see(farm, login, did) for login, did in ids.items()))

    t0 = time.perf_counter()
    seen = run(all_at_once())
    wall = time.perf_counter() - t0
    guests = [FarmPaths(farm.home).guest_name(did) for did in ids.values()]
    mem = [cgroup_memory(g) for g in guests]
    return {
        "desktops": n,
        "all_visible": all(seen),
        "visible": sum(seen),
        "wall_s": round(wall, 2),
        "total_usage_mib": round(sum(u for u, _ in mem) / 2**20, 1),
        "mean_usage_mib": round(statistics.mean(u for u, _ in mem) / 2**20, 1),
    }


def finish(args: argparse.Namespace, results: dict[str, object]) -> None:
    if args.json:
        print(json.dumps(results, indent=2))
        return
    ttd = results["time_to_desktop_s"]
    assert isinstance(ttd, dict)
    glx = "" if results.get("glx", True) else "  display.glx: off (desktops and floor)"
    print(f"machine: {results['machine']}  profile: {results['profile']}{glx}")
    first = results["first_desktop_s"]
    assert isinstance(first, dict)
    print(
        f"deckard up: {results['up_s']} s; first desktop after it: median {first['median']:.3f} s to first RFB byte "
        f"({len(first['runs'])} farms: {', '.join(f'{f:.3f}' for f in first['runs'])} s)"
    )
    print(f"  the first farm's phases (ms): {results['first_desktop_phases_ms']}")
    print(
        f"time to desktop (stopped → first RFB byte): median {ttd['median']:.3f} s "
        f"(min {ttd['min']:.3f}, max {ttd['max']:.3f}, {ttd['runs']} runs; its target is the ratio below)"
    )
    print(f"phases (median ms): {results['phases_median_ms']}")
    fl = results["floor_s"]
    assert isinstance(fl, dict)
    print(
        f"floor (bare container of the same image: lxc-start → RFB banner): median {fl['median']:.3f} s "
        f"(min {fl['min']:.3f}, {fl['runs']} runs; lxc-start itself {results['floor_lxc_start_ms']} ms)"
    )
    floor = fl["median"]
    print(
        f"ratio to the floor: cold start {ttd['median'] / floor:.2f}x (target ≤ 1.5x), "
        f"first connect after up {first['median'] / floor:.2f}x (target ≤ 2x; each farm's: "
        f"{', '.join(f'{f / floor:.2f}x' for f in first['runs'])})"
    )
    phases = results["phases_median_ms"]
    assert isinstance(phases, dict)
    shares = ", ".join(f"{p[2:-3]} {v / (fl['median'] * 1000):.2f}" for p, v in phases.items())
    print(f"each phase over the floor: {shares}")
    print(f"stopped → first frame the session has drawn: {results['time_to_drawn_s']}")
    print(f"a new user's first login, connect → first drawn frame: {results['new_user_drawn_s']}")
    target = MEMORY_TARGET_MIB.get(str(results["profile"]), 250)
    print(f"idle desktop memory: {results['idle_desktop_memory_mib']}  target ≤ {target} MiB")
    if "many_desktops" in results:
        print(f"{args.desktops} desktops at once: {results['many_desktops']}")


if __name__ == "__main__":
    main()
