"""The broker's tunnels at scale (issue 16, item 4): streams per core and their added latency; idle tunnels' memory.

A real farm of two nodes (``deckard.testing.FarmProcess``, ``deckard up --nodes 2``) with the **fake driver**:
node 1 (the all-in-one process: API, node and the broker the clients use) is blocked, so every desktop runs on
node 2, a process of its own, whose fake guests serve their displays on loopback addresses (RFB 3.8 with the
desktop's VNC secret, then an echo: ``drivers/fake_guest.py``).  What is measured is therefore node 1's process:
the broker, plus the farm's idle work (printed apart and subtracted where said).

1. **idle**: node 1's RSS and CPU after one tunnel has been opened and closed (warm-up);
2. **streams**: ``--streams`` tunnels (QVD protocol over TLS, login, ``connect_to_vm``, the viewer's RFB
   handshake) carry 1 MiB/s each way for ``--seconds`` (16 KiB every 1/64 s, each chunk stamped with its send
   time; the display echoes it): node 1's CPU over the window, less its idle CPU, gives streams per core (target
   ≥ 500 of 1 MiB/s), and the round trips give p50/p99.  The same streams then go to the same displays
   **directly** (plain TCP, the viewer doing VNC authentication itself): the difference of the two p99s is what
   the broker adds (target ≤ 1 ms).  Then once more through **socat** (``socat -b262144 OPENSSL-LISTEN:…,fork``
   with the broker's certificate, one per display, as ``bench/datapath.py`` runs it; the viewer does VNC
   authentication itself): socat's CPU gives its streams per core, the reference a Python relay is held to;
3. **idle tunnels**: ``--tunnels`` tunnels held open and silent: (RSS - idle) / tunnels, idle being measured
   again after the streams.  Target: ≤ 64 KiB per idle tunnel;
4. **after**: every tunnel closed, node 1's RSS again; then ``--rounds`` - 1 more rounds of opening and closing
   every tunnel, each followed by the RSS: memory that returns to where the first round left it is a cache filled
   once (SQLite's pages of the farm's rows, say), memory that climbs round after round would be a leak.

``--streams`` defaults to 50: on two CPUs the viewers (Python, TLS), the displays (node 2) and the broker share
them, and at 100 streams the machine saturates: the round trips then measure the queue for a CPU, direct too.

Usage: ``.venv/bin/python bench/tunnels.py [--tunnels 500] [--streams 50] [--seconds 10] [--rounds 3] [--json]``
(root).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sqlite3
import statistics
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from datapath import socat_path, tree_cpu_seconds, wait_listening  # bench/datapath.py
from deckard.client.broker import connect
from deckard.drivers.display import display_password, vnc_auth_response
from deckard.runtime.tls import client_context
from deckard.testing import FarmProcess, free_port, wait_for

PASSWORD = "bench-pass"
RFB = b"RFB 003.008\n"
VIEWER = RFB + b"\x01" + b"\x01"  # version, security None, shared ClientInit
CHUNK = 16 * 1024
RATE = 64  # chunks a second: 1 MiB/s
TICK = os.sysconf("SC_CLK_TCK")

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def own_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def own_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def through_broker(farm: FarmProcess, desktop_id: int) -> Stream:
    """A tunnel with the viewer's handshake done; the display's echo of the ClientInit has been read."""
    reader, writer = await connect(farm.broker, "bench", PASSWORD, farm.ca, desktop_id)
    if await reader.readexactly(len(RFB)) != RFB:
        raise RuntimeError("no RFB banner through the broker")
    writer.write(VIEWER)
    await reader.readexactly(6)  # security types (None) and the SecurityResult
    await reader.readexactly(1 + 12)  # the echo of the ClientInit and of the broker's SetEncodings
    return reader, writer


async def direct(ip: str, token: str) -> Stream:
    """The same display without the broker: VNC authentication with the desktop's secret, then the echo."""
    return await vnc_login(await asyncio.open_connection(ip, 5900), token)


async def vnc_login(conn: Stream, token: str) -> Stream:
    """The viewer's side of VNC authentication with the desktop's secret (what the broker does for its clients)."""
    reader, writer = conn
    await reader.readexactly(12)
    writer.write(RFB)
    await reader.readexactly(2)
    writer.write(b"\x02")
    challenge = await reader.readexactly(16)
    writer.write(vnc_auth_response(display_password(token), challenge))
    if await reader.readexactly(4) != b"\x00\x00\x00\x00":
        raise RuntimeError("the display refused the VNC secret")
    return conn


def start_socats(socat: str, farm: FarmProcess, targets: list[list[str]]) -> list[tuple[subprocess.Popen[bytes], int]]:
    """One ``socat -b262144 OPENSSL-LISTEN:…,fork`` per display, with the broker's certificate, listening."""
    tls = farm.home / "tls"
    socats = []
    for ip, _token in targets:
        port = free_port()
        listen = f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={tls / 'server.pem'}"
        argv = [socat, "-b262144", f"{listen},key={tls / 'server.key'},verify=0", f"TCP:{ip}:5900"]
        socats.append((subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port))
    try:
        for _proc, port in socats:
            wait_listening(port)
    except BaseException:
        stop_socats(socats)
        raise
    return socats


def stop_socats(socats: list[tuple[subprocess.Popen[bytes], int]]) -> None:
    for proc, _port in socats:
        proc.kill()
        proc.wait()


async def stream(conn: Stream, seconds: float, rtts: list[float]) -> None:
    """1 MiB/s each way: a stamped chunk every 1/64 s; the round trip of each echoed chunk into ``rtts``."""
    reader, writer = conn
    pad = os.urandom(CHUNK - 8)
    loop = asyncio.get_running_loop()
    start = loop.time() + (hash(id(conn)) % 1000) / 1000 / RATE  # spread the streams' ticks
    count = int(seconds * RATE)

    async def send() -> None:
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / RATE - loop.time()))
            writer.write(struct.pack("!d", time.perf_counter()) + pad)

    sender = asyncio.create_task(send())
    for _ in range(count):
        chunk = await reader.readexactly(CHUNK)
        rtts.append(time.perf_counter() - struct.unpack("!d", chunk[:8])[0])
    await sender


async def opened(n: int, opener: Callable[[int], Awaitable[Stream]], parallel: int = 16) -> list[Stream]:
    gate = asyncio.Semaphore(parallel)

    async def one(i: int) -> Stream:
        async with gate:
            return await opener(i)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def close_all(conns: list[Stream]) -> None:
    for _reader, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _r, w in conns), return_exceptions=True)


def percentiles(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(ms[int(len(ms) * 0.99) - 1], 3)}


async def run(farm: FarmProcess, ids: list[int], pid: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    await close_all([await through_broker(farm, ids[0])])  # warm-up: the broker's first tunnel
    await asyncio.sleep(3)
    cpu0, t0 = own_cpu(pid), time.monotonic()
    await asyncio.sleep(5)
    idle_cpu = (own_cpu(pid) - cpu0) / (time.monotonic() - t0)
    idle = own_rss_mb(pid)
    out["idle"] = {"rss_mb": round(idle, 1), "cpu_per_s": round(idle_cpu, 3)}

    # streams first, while node 2 runs only their desktops (its loop serves every fake display: 500 desktops
    # make it stall now and then, and the stalls, direct or not, would be all a p99 saw)
    streaming = await opened(args.streams, lambda i: through_broker(farm, ids[i]))
    rtts: list[float] = []
    cpu0, t0 = own_cpu(pid), time.monotonic()
    await asyncio.gather(*(stream(c, args.seconds, rtts) for c in streaming))
    took = time.monotonic() - t0
    cpu = (own_cpu(pid) - cpu0) / took
    relay_cpu = max(cpu - idle_cpu, 1e-6)
    out["streams"] = {
        "streams": args.streams,
        "seconds": round(took, 1),
        "cpu_per_s": round(cpu, 3),
        "streams_per_core": round(args.streams / relay_cpu),
        "streams_per_core_with_idle": round(args.streams / cpu),
        **percentiles(rtts),
    }
    print(f"tunnels: {args.streams} streams through the broker: {out['streams']}", flush=True)
    await close_all(streaming)

    with sqlite3.connect(farm.home / "deckard.db") as db:
        rows = dict(db.execute("SELECT id, ip || ' ' || agent_token FROM desktops").fetchall())
    targets = [rows[i].split() for i in ids[: args.streams]]
    plain = await opened(len(targets), lambda i: direct(*targets[i]))
    rtts = []
    await asyncio.gather(*(stream(c, args.seconds, rtts) for c in plain))
    out["direct"] = percentiles(rtts)
    print(f"tunnels: {args.streams} streams straight to the displays: {out['direct']}", flush=True)
    await close_all(plain)
    out["added_p99_ms"] = round(out["streams"]["p99_ms"] - out["direct"]["p99_ms"], 3)

    # the reference a user would otherwise put in front of the displays: socat, as bench/datapath.py runs it
    socats = await asyncio.to_thread(start_socats, socat_path(), farm, targets)
    try:
        ctx = client_context(farm.ca)

        async def through_socat(i: int) -> Stream:
            port = socats[i][1]
            conn = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
            return await vnc_login(conn, targets[i][1])

        via_socat = await opened(len(socats), through_socat)
        pids = [proc.pid for proc, _port in socats]
        rtts = []
        cpu0, t0 = tree_cpu_seconds(*pids), time.monotonic()
        await asyncio.gather(*(stream(c, args.seconds, rtts) for c in via_socat))
        cpu = (tree_cpu_seconds(*pids) - cpu0) / (time.monotonic() - t0)
        await close_all(via_socat)
    finally:
        stop_socats(socats)
    out["socat"] = {"cpu_per_s": round(cpu, 3), "streams_per_core": round(args.streams / cpu), **percentiles(rtts)}
    for key in ("streams_per_core", "streams_per_core_with_idle"):  # the broker's process less its idle work, or not
        out["streams"][f"{key}_to_socat"] = round(out["streams"][key] / out["socat"]["streams_per_core"], 2)
    print(f"tunnels: {args.streams} streams through socat (TLS): {out['socat']}", flush=True)
    await asyncio.sleep(8)
    idle = own_rss_mb(pid)  # the idle figure again, now that the streams' buffers have been used once
    out["idle"]["rss_mb_after_streams"] = round(idle, 1)

    tunnels = await opened(args.tunnels, lambda i: through_broker(farm, ids[i]))
    await asyncio.sleep(3)
    held = own_rss_mb(pid)
    out["idle_tunnels"] = {
        "tunnels": len(tunnels),
        "rss_mb": round(held, 1),
        "kib_per_tunnel": round((held - idle) * 1024 / len(tunnels), 1),
    }
    print(f"tunnels: {len(tunnels)} idle tunnels: {out['idle_tunnels']['kib_per_tunnel']} KiB each", flush=True)
    await close_all(tunnels)

    await asyncio.sleep(8)  # the broker gives the heap back a second after a burst of closes (server.py)
    after = [own_rss_mb(pid)]
    for _ in range(args.rounds - 1):  # again: a bounded cache filled once, or memory that grows every round?
        await close_all(await opened(args.tunnels, lambda i: through_broker(farm, ids[i])))
        await asyncio.sleep(8)
        after.append(own_rss_mb(pid))
    out["after"] = {"rss_mb": [round(a, 1) for a in after], "above_idle_mb": [round(a - idle, 1) for a in after]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tunnels", type=int, default=500)
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of opening and closing every tunnel")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.streams = min(args.streams, args.tunnels)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the farm inherits it: thousands of sockets
    net = f"127.{80 + os.getpid() % 40}.0.0/20"  # loopback: the fake driver binds its guests' addresses
    farm = FarmProcess(nodes=2, network=net, extra_env={"DECKARD_NODE__DRIVER": "fake"})
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()} cpus={os.cpu_count()}",
    }
    try:
        farm.up()
        farm.deckard("node", "block", farm.node_name(1))
        farm.deckard("user", "add", "bench", "--password", PASSWORD)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: farm.deckard("desktop", "add", f"d{i}", "--user", "bench"), range(args.tunnels)))
        rows: Any = farm.json("desktop", "list")
        ids = sorted(int(r["id"]) for r in rows)
        wait_for(lambda: farm.pid() is not None, 10, what="the farm's pid")
        pid = farm.pid()
        assert pid is not None
        out.update(asyncio.run(run(farm, ids, pid, args)))
    finally:
        farm.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return
    idle_tunnels, streams = out["idle_tunnels"], out["streams"]
    print(f"{out['machine']}, {out['date']}: node 1 (API, node, broker) idle: {out['idle']}")
    print(f"  idle tunnel: {idle_tunnels['kib_per_tunnel']} KiB of broker memory (target <= 64)")
    print(
        f"  {streams['streams']} streams of 1 MiB/s each way: {streams['streams_per_core']} streams per core "
        f"({streams['streams_per_core_with_idle']} with the farm's idle work; target >= 500); "
        f"socat (TLS) on the same displays: {out['socat']['streams_per_core']} "
        f"({streams['streams_per_core_to_socat']}x; {streams['streams_per_core_with_idle_to_socat']}x with idle work)"
    )
    print(
        f"  round trip p50/p99: {streams['p50_ms']}/{streams['p99_ms']} ms through the broker, "
        f"{out['direct']['p50_ms']}/{out['direct']['p99_ms']} ms direct: added p99 {out['added_p99_ms']} ms "
        "(target <= 1)"
    )
    print(f"  after closing every tunnel, round by round: {out['after']['above_idle_mb']} MB above idle")


if __name__ == "__main__":
    main()
