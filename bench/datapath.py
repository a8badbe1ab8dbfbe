"""The broker's data path against the relays users would otherwise put in front of a desktop (issue 16, item 4).

A real all-in-one farm (``deckard.testing.FarmProcess``) with one LXC desktop of the minimal image.  A viewer
(``bench/_rfb.py``) asks Xvnc for full-screen updates in Raw encoding as fast as they come, through four relays
in turn, in the same run, to the same desktop:

* **broker, TLS**: QVD's protocol (``GET /qvd/connect_to_vm`` + ``Upgrade``), as ``deckard connect`` speaks it;
* **socat**: ``socat -b262144 OPENSSL-LISTEN:…,fork TCP:<desktop>:5900``, the usual TLS wrapper, with the
  broker's own certificate; the viewer does VNC authentication itself;
* **broker, WebSocket**: ``wss://…/ws/connect`` with a portal ticket, the browser's path;
* **websockify** 0.13 with ``--ssl-only`` and the same certificate (OpenStack's and Kasm's noVNC proxy).

For each: MB/s the viewer receives, and the relay's CPU seconds per GB moved (user + system time of the relay's
processes, children included, from ``/proc``; for the broker the whole farm process, which also runs the API and
the node: an upper bound).  Targets (issue 16): broker TLS ≥ 1.2 times socat's MB/s at ≤ 0.8 times its CPU per GB;
broker WebSocket ≥ 2 times websockify's MB/s at ≤ 0.6 times its CPU per GB.

socat comes from apt and websockify from PyPI into ``.cache/bench-tools`` the first time (both only for this
benchmark).  Usage: ``.venv/bin/python bench/datapath.py [--seconds 5] [--runs 3] [--json]`` (root; LXC).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import websockets

from _rfb import RawViewer, WsBytes, stream_io  # bench/_rfb.py
from deckard.client.broker import connect
from deckard.drivers.display import display_password
from deckard.runtime.tls import client_context
from deckard.testing import FarmProcess, free_port
from peripherals import PASSWORD, Panel  # bench/peripherals.py: the portal's tickets, spoken by a script

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".cache" / "bench-tools"
WEBSOCKIFY_VERSION = "0.13.0"
TICK = os.sysconf("SC_CLK_TCK")


def socat_path() -> str:
    """socat, installed from apt the first time (``bench/tunnels.py`` uses it too)."""
    if shutil.which("socat") is None:
        print("bench: installing socat (apt)", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "socat"], check=True, stdout=subprocess.DEVNULL)
    return str(shutil.which("socat"))


def _tools() -> tuple[str, str]:
    """socat and websockify, installed the first time."""
    socat = socat_path()
    websockify = TOOLS / "bin" / "websockify"
    if not websockify.exists():
        print(f"datapath: installing websockify {WEBSOCKIFY_VERSION} into {TOOLS}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS)], check=True)
        pip = [str(TOOLS / "bin" / "pip"), "install", "-q", f"websockify=={WEBSOCKIFY_VERSION}"]
        subprocess.run(pip, check=True)
    return socat, str(websockify)


def tree_cpu_seconds(*pids: int) -> float:
    """User + system CPU of ``pids`` and their live descendants (and of their waited-for children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, list(pids)
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / TICK  # utime stime cutime cstime
        todo += children.get(p, [])
    return total


def _start_relays(
    socat: str, websockify: str, ip: str, cert: Path, key: Path, socat_port: int, ws_port: int
) -> list[subprocess.Popen[bytes]]:
    """socat and websockify in front of the desktop's Xvnc, with the broker's certificate, listening."""
    listen = f"OPENSSL-LISTEN:{socat_port},bind=127.0.0.1,reuseaddr,fork,cert={cert},key={key},verify=0"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    relays = [
        subprocess.Popen([socat, "-b262144", listen, f"TCP:{ip}:5900"], **quiet),  # type: ignore[call-overload]
        subprocess.Popen(
            [websockify, "--ssl-only", f"--cert={cert}", f"--key={key}", f"127.0.0.1:{ws_port}", f"{ip}:5900"],
            **quiet,  # type: ignore[call-overload]
        ),
    ]
    wait_listening(socat_port)
    wait_listening(ws_port)
    return relays


def wait_listening(port: int, deadline: float = 20.0) -> None:
    import socket

    end = time.monotonic() + deadline
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


async def _measure(open_viewer: Callable[[], Awaitable[tuple[RawViewer, Any]]], pid: int, seconds: float) -> dict:
    viewer, closer = await open_viewer()
    try:
        await viewer.stream(0.5)  # warm-up: buffers, Xvnc's first full frame
        cpu0 = tree_cpu_seconds(pid)
        got, took = await viewer.stream(seconds)
        cpu = tree_cpu_seconds(pid) - cpu0
    finally:
        await closer()
    return {"mb_s": got / took / 1e6, "cpu_s_per_gb": cpu / (got / 1e9)}


async def measure(
    farm: FarmProcess, desktop_id: int, seconds: float, runs: int, tools: tuple[str, str], only: set[str]
) -> dict[str, Any]:
    socat, websockify = tools
    panel = Panel(farm, desktop_id)
    await panel.login()
    await panel.start_desktop()
    ip = str(farm.desktop("bench-desk")["ip"])
    with sqlite3.connect(farm.home / "deckard.db") as db:
        token = db.execute("SELECT agent_token FROM desktops WHERE id = ?", (desktop_id,)).fetchone()[0]
    password = display_password(token)
    tls = farm.home / "tls"
    ca, cert, key = tls / "ca.pem", tls / "server.pem", tls / "server.key"
    ctx = client_context(ca)
    pgrep = ["pgrep", "-f", f"up --foreground.*--home {farm.home}"]
    farm_pid = int((await asyncio.to_thread(subprocess.check_output, pgrep)).split()[0])
    socat_port, ws_port = free_port(), free_port()
    relays = await asyncio.to_thread(_start_relays, socat, websockify, ip, cert, key, socat_port, ws_port)
    try:

        async def broker_tls() -> tuple[RawViewer, Any]:
            server = f"127.0.0.1:{farm.broker_port}"
            reader, writer = await connect(server, "bench", PASSWORD, ca, desktop_id)
            viewer = RawViewer(*stream_io(reader, writer))
            await viewer.handshake()
            return viewer, _closer(writer)

        async def socat_tls() -> tuple[RawViewer, Any]:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", socat_port, ssl=ctx, server_hostname="127.0.0.1"
            )
            viewer = RawViewer(*stream_io(reader, writer))
            await viewer.handshake(password)
            return viewer, _closer(writer)

        async def broker_ws() -> tuple[RawViewer, Any]:
            ws = await websockets.connect(await panel.ticket("connect"), ssl=panel.ctx, max_size=None)
            stream = WsBytes(ws)  # skips the broker's progress lines (text) before the display's first bytes
            viewer = RawViewer(stream.read, stream.send, stream.skip)
            await viewer.handshake()
            return viewer, ws.close

        async def websockify_ws() -> tuple[RawViewer, Any]:
            ws = await websockets.connect(
                f"wss://127.0.0.1:{ws_port}/",
                ssl=ctx,
                max_size=None,
                subprotocols=["binary"],
                server_hostname="127.0.0.1",
            )
            stream = WsBytes(ws)
            viewer = RawViewer(stream.read, stream.send, stream.skip)
            await viewer.handshake(password)
            return viewer, ws.close

        plan = {
            "broker_tls": (broker_tls, farm_pid),
            "socat": (socat_tls, relays[0].pid),
            "broker_ws": (broker_ws, farm_pid),
            "websockify": (websockify_ws, relays[1].pid),
        }
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in plan}
        for run in range(runs):
            for name, (opener, pid) in plan.items():
                if only and name not in only:
                    continue
                print(f"datapath: run {run + 1}/{runs} {name:10} measuring (pid {pid})", flush=True)
                rows[name].append(await _measure(opener, pid, seconds))
                print(
                    f"datapath: run {run + 1}/{runs} {name:10} {rows[name][-1]['mb_s']:7.1f} MB/s "
                    f"{rows[name][-1]['cpu_s_per_gb']:5.2f} CPU s/GB",
                    flush=True,
                )
    finally:
        for relay in relays:
            relay.terminate()
            relay.wait(10)
    med = {
        name: {k: round(statistics.median(r[k] for r in runs_), 2) for k in ("mb_s", "cpu_s_per_gb")}
        for name, runs_ in rows.items()
        if runs_
    }

    def ratio(name: str, reference: str, key: str) -> float | None:
        if name not in med or reference not in med:
            return None
        return round(med[name][key] / med[reference][key], 2)

    return {
        "seconds": seconds,
        "runs": runs,
        "relays": med,
        "tls_mb_s_ratio": ratio("broker_tls", "socat", "mb_s"),
        "tls_cpu_ratio": ratio("broker_tls", "socat", "cpu_s_per_gb"),
        "ws_mb_s_ratio": ratio("broker_ws", "websockify", "mb_s"),
        "ws_cpu_ratio": ratio("broker_ws", "websockify", "cpu_s_per_gb"),
    }


def _closer(writer: asyncio.StreamWriter) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    return close


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--relays", default="", help="comma-separated subset of broker_tls,socat,broker_ws,websockify")
    args = ap.parse_args()
    tools = _tools()
    only = {r for r in args.relays.split(",") if r}
    farm = FarmProcess()
    out: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()} cpus={os.cpu_count()}"}
    try:
        farm.up()
        desk = farm.user_with_desktop("bench", PASSWORD, "bench-desk")
        out.update(asyncio.run(measure(farm, int(desk["id"]), args.seconds, args.runs, tools, only)))
    finally:
        farm.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{out['machine']}: medians of {out['runs']} runs of {out['seconds']:g} s")
    for name, r in out["relays"].items():
        print(f"  {name:11} {r['mb_s']:8.1f} MB/s  {r['cpu_s_per_gb']:5.2f} CPU s/GB")
    print(
        f"  broker TLS / socat:            {out['tls_mb_s_ratio']}x MB/s (target >= 1.2), "
        f"{out['tls_cpu_ratio']}x CPU/GB (target <= 0.8)"
    )
    print(
        f"  broker WebSocket / websockify: {out['ws_mb_s_ratio']}x MB/s (target >= 2), "
        f"{out['ws_cpu_ratio']}x CPU/GB (target <= 0.6)"
    )


if __name__ == "__main__":
    main()
