"""Abuse of a running farm (issue 8): slow clients and huge bodies, the farm's memory, a real user's connects.

Runs a real all-in-one farm (``deckard.testing.FarmProcess``, its own home and ports) with the **fake driver**
on a loopback desktop network: the API, the node and the broker are the real processes, and the one desktop
is the fake driver's guest on its desktop address (``127.77.x.11``): the real agent RPC, and a display that
speaks RFB 3.8 with VNC authentication (the per-desktop secret, as Xvnc does in a real desktop) and then
echoes (drivers/fake_guest.py).  Only loopback traffic; every attack is bounded in count and time.

1. idle: the farm's RSS (the ``deckard up`` process tree) after a warm-up connect;
2. attack, for ``--seconds``: ``--slow`` slow broker connections (half from one address, half spread over
   100 addresses; a third of them never start TLS, the rest send a request head a byte a second, and each
   reconnects when the broker cuts it off), plus ``--bodies`` concurrent 200 MB ``POST /api/v1/auth/login``
   bodies to the API, repeated; meanwhile a user connects ``--connects`` times (TLS, Basic login,
   ``connect_to_vm``, ``101``, first desktop byte): p50/p99;
3. after: every attacker gone, the farm's RSS again (target: within +50 MB of idle).

Usage: ``.venv/bin/python bench/abuse.py [--slow 5000] [--bodies 4] [--connects 50] [--seconds 40] [--no-trim]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import random
import resource
import ssl
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deckard.client import broker as qvd
from deckard.runtime.tls import client_context
from deckard.testing import FarmProcess, wait_for

PASSWORD = "bench-pass"
BODY = 200 * 1024 * 1024
CHUNK = 256 * 1024


# ---------------------------------------------------------------- measuring


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and all its descendants (MB)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


@dataclass
class Attack:
    broker: tuple[str, int]
    api: tuple[str, int]
    ctx: ssl.SSLContext
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    opened: int = 0
    refused: int = 0
    cut_off: int = 0
    body_results: list[tuple[int, str]] = field(default_factory=list)

    async def slow_client(self, source: str, tls: bool) -> None:
        """One slow client, reconnecting whenever the broker drops it, until the attack ends."""
        while not self.stop.is_set():
            writer = None
            try:
                if tls:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(
                            *self.broker, ssl=self.ctx, server_hostname="127.0.0.1", local_addr=(source, 0)
                        ),
                        15,
                    )
                    self.opened += 1
                    writer.write(b"GET /qvd/ping HTTP/1.1\r\nX-Slow: ")
                    while not self.stop.is_set():
                        writer.write(b"x")
                        with contextlib.suppress(TimeoutError):
                            if not await asyncio.wait_for(reader.read(1024), 1.0):
                                break  # closed by the broker
                            break  # it answered (an error status): start again
                else:
                    reader, writer = await asyncio.open_connection(*self.broker, local_addr=(source, 0))
                    self.opened += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(reader.read(1), 60)
                self.cut_off += 1
            except (ConnectionError, ssl.SSLError, OSError, TimeoutError, asyncio.IncompleteReadError):
                self.refused += 1
                await asyncio.sleep(1.0 + random.random())  # then try again, for as long as the attack lasts
            finally:
                if writer is not None:
                    writer.close()

    async def big_body(self) -> None:
        """``POST /api/v1/auth/login`` announcing and sending 200 MB, until the API answers or closes."""
        while not self.stop.is_set():
            writer = None
            sent, status = 0, "closed"
            try:
                reader, writer = await asyncio.open_connection(*self.api, ssl=self.ctx, server_hostname="127.0.0.1")
                writer.write(
                    f"POST /api/v1/auth/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {BODY}\r\n\r\n".encode()
                )
                chunk = b"x" * CHUNK
                answer = asyncio.ensure_future(reader.readline())
                while sent < BODY and not answer.done() and not self.stop.is_set():
                    writer.write(chunk)
                    await writer.drain()
                    sent += CHUNK
                line = await asyncio.wait_for(answer, 30)
                status = line.decode(errors="replace").strip() or "closed"
            except (ConnectionError, ssl.SSLError, OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                status = type(e).__name__
            finally:
                if writer is not None:
                    writer.close()
            self.body_results.append((sent, status))


async def user_connects(farm: FarmProcess, desktop_id: int, n: int, pause: float) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        reader, writer = await qvd.connect(farm.broker, "bench", PASSWORD, farm.ca, desktop_id)
        await asyncio.wait_for(reader.readexactly(12), 10)  # the RFB greeting, after the broker's VNC auth
        times.append(time.perf_counter() - t0)
        writer.close()
        await asyncio.sleep(pause)
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def attack(
    broker: tuple[str, int], api: tuple[str, int], ca: str, slow: int, bodies: int, seconds: float
) -> dict[str, Any]:
    """The attackers, for ``seconds``; returns what they saw."""
    atk = Attack(broker, api, client_context(Path(ca)))
    tasks = []
    for i in range(slow):
        source = "127.0.0.2" if i % 2 == 0 else f"127.0.1.{1 + (i // 2) % 100}"
        tasks.append(asyncio.create_task(atk.slow_client(source, tls=i % 3 != 0)))
    tasks += [asyncio.create_task(atk.big_body()) for _ in range(bodies)]
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    atk.stop.set()
    await asyncio.wait(tasks, timeout=30)
    for t in tasks:
        t.cancel()
    sent = [n for n, _ in atk.body_results]
    return {
        "slow_connections": {
            "clients": slow,
            "opened": atk.opened,
            "cut_off_by_broker": atk.cut_off,
            "refused": atk.refused,
            "attack_s": round(time.monotonic() - t0, 1),
        },
        "bodies": {
            "requests": len(sent),
            "max_sent_mb": round(max(sent, default=0) / 2**20, 1),
            "answers": sorted({a for _, a in atk.body_results}),
        },
    }


def _attack_process(queue: Any, *args: Any) -> None:
    queue.put(asyncio.run(attack(*args)))


async def run(farm: FarmProcess, desktop_id: int, args: argparse.Namespace) -> dict[str, Any]:
    pid = farm.pid()
    assert pid, "the farm is not running"
    out: dict[str, Any] = {}
    await user_connects(farm, desktop_id, 5, 0.1)  # warm-up: the desktop starts, the code paths load
    await asyncio.sleep(3)
    out["rss_idle_mb"] = round(tree_rss_mb(pid), 1)
    out["user_connect_idle_s"] = _summary(await user_connects(farm, desktop_id, 20, 0.05))

    host, port = farm.broker.split(":")
    queue: Any = multiprocessing.get_context("spawn").Queue()
    attacker = multiprocessing.get_context("spawn").Process(
        target=_attack_process,
        args=(queue, (host, int(port)), ("127.0.0.1", farm.api_port), str(farm.ca), args.slow, args.bodies,
              args.seconds),
    )  # fmt: skip
    attacker.start()
    peak = 0.0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss_mb(pid))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    await asyncio.sleep(min(10.0, args.seconds / 3))  # let the attack build up before the user comes
    times = await user_connects(farm, desktop_id, args.connects, args.pause)
    out["rss_during_mb"] = round(tree_rss_mb(pid), 1)
    out.update(await asyncio.to_thread(queue.get))
    await asyncio.to_thread(attacker.join, 30)
    stop.set()
    await sampler
    out["rss_peak_during_mb"] = round(peak, 1)
    out["user_connect_under_attack_s"] = _summary(times)
    await asyncio.sleep(args.settle)
    out["rss_after_mb"] = round(tree_rss_mb(pid), 1)
    out["rss_after_minus_idle_mb"] = round(out["rss_after_mb"] - out["rss_idle_mb"], 1)
    out["user_connect_after_s"] = _summary(await user_connects(farm, desktop_id, 10, 0.05))
    return out


def _summary(times: list[float]) -> dict[str, float]:
    return {
        "n": len(times),
        "p50": round(statistics.median(times), 3),
        "p99": round(pct(times, 0.99), 3),
        "max": round(max(times), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slow", type=int, default=5000)
    ap.add_argument("--bodies", type=int, default=4)
    ap.add_argument("--connects", type=int, default=50)
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between the user's connects")
    ap.add_argument("--seconds", type=float, default=40.0, help="how long the attack lasts")
    ap.add_argument("--settle", type=float, default=8.0, help="seconds after the attack before measuring")
    ap.add_argument("--no-trim", action="store_true", help="broker.trim_heap = false, to measure what it gives")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the farm inherits it: thousands of sockets

    env = {"DECKARD_NODE__DRIVER": "fake"}
    if args.no_trim:
        env["DECKARD_BROKER__TRIM_HEAP"] = "false"
    farm = FarmProcess(network=f"127.77.{os.getpid() % 250}.0/24", extra_env=env)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} cpus={os.cpu_count()} python={platform.python_version()}",
        "driver": "fake (guests on loopback)",
        "trim_heap": not args.no_trim,
    }
    try:
        farm.up()
        desk = farm.user_with_desktop("bench", PASSWORD, "bench-desk")
        wait_for(lambda: farm.pid() is not None, 10, what="the farm's pid")
        results.update(asyncio.run(run(farm, int(desk["id"]), args)))
    finally:
        farm.close()
    if args.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
