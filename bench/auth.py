"""Logins through the broker (issue 10): LDAP on loopback, local argon2 passwords, and logins under attack.

A real broker (``deckard.broker.server.Broker``, in its own process so the clients do not share its CPU) on a
SQLite farm, and a real slapd (``tests/slapd.py``) on loopback.  Each login is a ``GET /qvd/list_of_vm`` with
``Authorization: Basic`` over TLS, as QVD's client sends it; every worker keeps one connection and alternates
users, so each request is a full login through the chain (lockout, plugin, account, rules, audit record).

1. LDAP: ``auth.chain = ldap`` (search with the service account, then bind): p50/p95 latency of logins arriving
   at 100 per second, and the most logins/s ``--workers`` clients get through;
2. local: ``auth.chain = local`` (argon2id): logins/s;
3. attack: 200 concurrent clients sending wrong passwords for other accounts from four other loopback addresses
   (in a process of their own), while the same workers as in 1 log in: their logins/s against step 1's (target:
   within 2x).

Usage: ``.venv/bin/python bench/auth.py [--seconds 10] [--workers 16]`` (needs slapd; no root).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from deckard.db.engine import Database, migrate
from deckard.runtime.tls import client_context, ensure_tls
from deckard.services import config, users
from deckard.services.context import SYSTEM
from deckard.services.tenancy import bootstrap_farm
from slapd import ALICE, BASE_DN, BOB, CAROL, SERVICE_DN, SERVICE_PASSWORD, ZOE, Slapd

DIRECTORY_USERS = [(p.login, p.password) for p in (ALICE, BOB, ZOE, CAROL)]
LOCAL_USERS = [(f"local{i}", f"pw-local-{i}") for i in range(8)]
ATTACKER_ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]


def _basic(login: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def _broker_main(url: str, tls_dir: str, port_file: str) -> None:
    """The broker's own process: serve until killed."""
    import uvloop

    from deckard.broker.server import Broker
    from deckard.runtime.settings import BrokerSettings
    from deckard.runtime.tls import server_context

    async def serve() -> None:
        db = Database(url)
        await db.start()
        _ca, cert, key = ensure_tls(Path(tls_dir))
        broker = Broker(db, BrokerSettings(max_connections_per_address=256), server_context(cert, key))
        await broker.start("127.0.0.1", 0)
        Path(port_file + ".tmp").write_text(str(broker.port))
        Path(port_file + ".tmp").rename(port_file)  # whole, or not there
        await asyncio.Event().wait()

    uvloop.run(serve())


class Client:
    """One TLS connection speaking QVD's list request; reconnects when the broker closes it."""

    def __init__(self, port: int, ca: Path, source: str = "127.0.0.1") -> None:
        self.port, self.ctx, self.source = port, client_context(ca), source
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def login(self, login: str, password: str) -> int:
        for _attempt in range(2):
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(
                        "127.0.0.1", self.port, ssl=self.ctx, server_hostname="127.0.0.1", local_addr=(self.source, 0)
                    )
                assert self.reader is not None
                head = f"GET /qvd/list_of_vm? HTTP/1.1\r\nAuthorization: {_basic(login, password)}\r\n\r\n"
                self.writer.write(head.encode())
                raw = await self.reader.readuntil(b"\r\n\r\n")
                lines = raw.decode("latin-1").split("\r\n")
                length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
                await self.reader.readexactly(length)
                status = int(lines[0].split()[1])
                if any(x.lower() == "connection: close" for x in lines):
                    await self.close()
                return status
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                await self.close()
        return 0

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def _run_workers(
    port: int, ca: Path, accounts: list[tuple[str, str]], workers: int, seconds: float
) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal failures
        client = Client(port, ca)
        n = i
        while time.monotonic() < deadline:
            login, password = accounts[n % len(accounts)]
            n += 1
            t0 = time.perf_counter()
            status = await client.login(login, password)
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                failures += 1
        await client.close()

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(workers)))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "logins": len(latencies),
        "failures": failures,
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "p95_ms": round(latencies[int(len(latencies) * 0.95)] * 1000, 1) if latencies else None,
    }


async def _paced(port: int, ca: Path, accounts: list[tuple[str, str]], rate: float, seconds: float) -> dict[str, Any]:
    """Logins arriving at a fixed ``rate`` (open loop, as people arrive): the latency each one sees."""
    clients = [Client(port, ca) for _ in range(31)]  # not a multiple of the accounts: every login is a new one
    idle: asyncio.Queue[Client] = asyncio.Queue()
    for c in clients:
        idle.put_nowait(c)
    latencies: list[float] = []

    async def one(n: int) -> None:
        client = await idle.get()
        login, password = accounts[n % len(accounts)]
        t0 = time.perf_counter()
        if await client.login(login, password) == 200:
            latencies.append(time.perf_counter() - t0)
        idle.put_nowait(client)

    tasks = []
    start = time.perf_counter()
    for n in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for c in clients:
        await c.close()
    latencies.sort()
    return {
        "rate": rate,
        "achieved_per_s": round(len(latencies) / elapsed, 1),  # below ``rate``: the logins fell behind
        "logins": len(latencies),
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "p95_ms": round(latencies[int(len(latencies) * 0.95)] * 1000, 1) if latencies else None,
    }


async def _attack(port: int, ca: Path, clients: int, seconds: float) -> dict[str, int]:
    counts: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    async def attacker(i: int) -> None:
        client = Client(port, ca, ATTACKER_ADDRESSES[i % len(ATTACKER_ADDRESSES)])
        while time.monotonic() < deadline:
            name = random.choice(["mallory", "eve", f"nobody{i}", "admin"])  # other people's accounts
            status = await client.login(name, f"guess-{random.random()}")
            counts[str(status)] = counts.get(str(status), 0) + 1
        await client.close()

    await asyncio.gather(*(attacker(i) for i in range(clients)))
    return counts


def _attack_main(port: int, ca: str, clients: int, seconds: float, out: Any) -> None:
    """The attackers' own process: their TLS and parsing do not slow the honest clients' event loop."""
    out.put(asyncio.run(_attack(port, Path(ca), clients, seconds)))


async def _configure(url: str, settings: dict[str, Any]) -> None:
    db = Database(url)
    await db.start()
    try:
        for key, value in settings.items():
            await config.set_config(db, SYSTEM, key, value)
    finally:
        await db.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="deckard-bench-auth-"))
    url = f"sqlite+aiosqlite:///{home}/farm.db"
    migrate(url)
    db = Database(url)
    await db.start()
    await bootstrap_farm(db)
    for login, password in LOCAL_USERS:
        await users.create_user(db, SYSTEM, login, password)
    for login, _password in DIRECTORY_USERS:
        await users.create_user(db, SYSTEM, login, None)  # directory accounts exist in Deckard (no auto-provisioning)
    await db.close()
    ca, _cert, _key = ensure_tls(home / "tls")
    port_file = home / "port"
    ctx = multiprocessing.get_context("spawn")
    broker = ctx.Process(target=_broker_main, args=(url, str(home / "tls"), str(port_file)), daemon=True)
    out: dict[str, Any] = {"machine": f"{platform.node()} ({multiprocessing.cpu_count()} CPUs)"}
    with Slapd() as directory:
        await _configure(
            url,
            {
                "auth.ldap.url": directory.url,
                "auth.ldap.bind_dn": SERVICE_DN,
                "auth.ldap.bind_password": SERVICE_PASSWORD,
                "auth.ldap.base_dn": BASE_DN,
                "auth.ldap.user_filter": "(|(uid={login})(sAMAccountName={login}))",
                "auth.chain": "ldap",
            },
        )
        broker.start()
        try:
            while not port_file.exists():  # noqa: ASYNC110 - another process writes it
                await asyncio.sleep(0.05)
            port = int(port_file.read_text())
            await _run_workers(port, ca, DIRECTORY_USERS, args.workers, 2)  # warm-up: pools, caches
            out["ldap_at_100_per_s"] = await _paced(port, ca, DIRECTORY_USERS, 100, args.seconds)
            out["ldap"] = await _run_workers(port, ca, DIRECTORY_USERS, args.workers, args.seconds)
            answers = ctx.Queue()
            attack = ctx.Process(target=_attack_main, args=(port, str(ca), args.attackers, args.seconds + 3, answers))
            attack.start()
            await asyncio.sleep(2)  # the attack under way
            out["ldap_under_attack"] = await _run_workers(port, ca, DIRECTORY_USERS, args.workers, args.seconds)
            out["attack_answers"] = await asyncio.to_thread(answers.get, True, 60)
            attack.join()
            out["attack_ratio"] = round(out["ldap"]["per_s"] / max(out["ldap_under_attack"]["per_s"], 0.1), 2)
            await _configure(url, {"auth.chain": "local"})
            out["local"] = await _run_workers(port, ca, LOCAL_USERS, args.workers, args.seconds)
        finally:
            broker.kill()
            broker.join()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--attackers", type=int, default=200)
    result = asyncio.run(main(parser.parse_args()))
    print(json.dumps(result, indent=2))
