"""Admin API at scale (issue 3): a filtered, sorted page of desktops and a bulk start, on PostgreSQL.

Starts a throwaway PostgreSQL 15 cluster (as the ``postgres`` user, on 127.0.0.1, like ``tests/conftest.py``),
fills it with 20,000 desktops and 5,000 users (bulk INSERTs, not the API: the subject is reading and acting,
not creating), registers a fake running node, serves the real API over TLS and measures, through ``ApiClient``:

a. ``GET /desktops?osf=web&state=stopped&sort=-created_at&per_page=50`` (with its total): median of 50
   requests; target ≤ 50 ms;
b. ``POST /desktops/bulk/start`` of 1,000 desktops accepted (commands written, nodes notified); target ≤ 2 s.

Usage: ``.venv/bin/python bench/api_scale.py [--desktops 20000] [--users 5000] [--bulk 1000]`` (root).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from deckard.client.api import ApiClient
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import Unavailable
from deckard.model.network import mac_for_ip
from deckard.model.schemas import Desktop
from deckard.runtime.tls import ensure_tls
from deckard.services.tenancy import bootstrap_farm
from deckard.testing import PgCluster, free_port

QUERY = [("osf", "web"), ("state", "stopped"), ("sort", "-created_at"), ("per_page", "50")]


@contextmanager
def pg_cluster() -> Iterator[str]:
    """A throwaway cluster (deckard.testing.PgCluster); yields the URL of a fresh database in it."""
    cluster = PgCluster().init()
    try:
        yield cluster.create_database("bench")
    finally:
        cluster.close()


async def fill(db: Database, n_users: int, n_desktops: int) -> int:
    """Users, an OSF ``web`` beside ``default``, desktops spread over both, one running node; the node id."""
    now = utcnow()
    async with db.begin() as conn:
        tenant_id = (await conn.execute(sa.select(t.tenants.c.id).where(t.tenants.c.name == "default"))).scalar_one()
        default_osf = (
            await conn.execute(
                sa.select(t.osfs.c.id).where(t.osfs.c.tenant_id == tenant_id, t.osfs.c.name == "default")
            )
        ).scalar_one()
        web_osf = (
            await conn.execute(
                sa.insert(t.osfs).values(tenant_id=tenant_id, name="web", created_at=now).returning(t.osfs.c.id)
            )
        ).scalar_one()
        await conn.execute(
            sa.insert(t.users),
            [{"tenant_id": tenant_id, "login": f"u{i:05d}", "created_at": now} for i in range(n_users)],
        )
        user_ids = [r.id for r in await conn.execute(sa.select(t.users.c.id).order_by(t.users.c.id))]
        hosts = ipaddress.ip_network("10.128.0.0/14").hosts()
        rows = []
        for i in range(n_desktops):
            ip = str(next(hosts))
            rows.append(
                {
                    "tenant_id": tenant_id,
                    "name": f"d{i:05d}",
                    "user_id": user_ids[i % len(user_ids)],
                    "osf_id": web_osf if i % 2 else default_osf,
                    "ip": ip,
                    "mac": mac_for_ip(ip),
                    "created_at": now,
                    "state_at": now,
                    "state": "running" if i % 10 == 0 else "stopped",
                }
            )
        for i in range(0, len(rows), 5000):
            await conn.execute(sa.insert(t.desktops), rows[i : i + 5000])
        node_id = (
            await conn.execute(
                sa.insert(t.nodes)
                .values(
                    name="bench-node",
                    state="running",
                    heartbeat_at=now,
                    mem_total_mib=10_000_000,
                    mem_free_mib=10_000_000,
                    cpus=64,
                    created_at=now,
                )
                .returning(t.nodes.c.id)
            )
        ).scalar_one()
        await conn.execute(sa.text("ANALYZE"))
    return int(node_id)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--desktops", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--bulk", type=int, default=1_000)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the PostgreSQL cluster runs as the postgres user")
    with pg_cluster() as url, tempfile.TemporaryDirectory(prefix="deckard-bench-") as home:
        db = Database(url)
        await db.start()
        password = await bootstrap_farm(db)
        assert password is not None
        t0 = time.perf_counter()
        node_id = await fill(db, args.users, args.desktops)
        fill_s = time.perf_counter() - t0
        ca, _cert, _key = ensure_tls(Path(home) / "tls")
        # the API in its own process, as in production: a server sharing the client's process measures the GIL
        port = free_port()
        server = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is timed
            [
                sys.executable,
                "-m",
                "deckard.cli.main",
                "api",
                "--home",
                home,
                "--api-port",
                str(port),
                "--listen",
                "127.0.0.1",
                "--database",
                url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        api = ApiClient(f"https://127.0.0.1:{port}", None, ca)
        for _ in range(200):
            try:
                await asyncio.to_thread(api.health)
                break
            except Unavailable:
                await asyncio.sleep(0.1)
        try:
            await asyncio.to_thread(api.login, "admin", password)
            page = await asyncio.to_thread(api.list_page, "desktops", Desktop, QUERY)  # warm up connections and caches
            times = []
            for _ in range(args.requests):
                s = time.perf_counter()
                page = await asyncio.to_thread(api.list_page, "desktops", Desktop, QUERY)
                times.append((time.perf_counter() - s) * 1000)
            health: list[float] = []
            base = []  # the fixed cost of an authenticated request (TLS, token, access log), for comparison
            for _ in range(args.requests):
                s = time.perf_counter()
                await asyncio.to_thread(api.whoami)
                hs = time.perf_counter()
                await asyncio.to_thread(api.health)
                health.append((time.perf_counter() - hs) * 1000)
                base.append((hs - s) * 1000)
            async with db.begin() as conn:  # the fake node's heartbeat must be fresh for placement
                await conn.execute(sa.update(t.nodes).where(t.nodes.c.id == node_id).values(heartbeat_at=utcnow()))
                ids = [
                    r.id
                    for r in await conn.execute(
                        sa.select(t.desktops.c.id)
                        .where(t.desktops.c.state == "stopped")
                        .order_by(t.desktops.c.id)
                        .limit(args.bulk)
                    )
                ]
            s = time.perf_counter()
            out = await asyncio.to_thread(api.bulk, "desktops", "start", ids=ids)
            bulk_s = time.perf_counter() - s
        finally:
            api.close()
            server.terminate()
            server.wait(10)
            await db.close()
    result = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, PostgreSQL 15",
        "desktops": args.desktops,
        "users": args.users,
        "fill_s": round(fill_s, 2),
        "page_query": "&".join(f"{k}={v}" for k, v in QUERY),
        "page_total": page.total,
        "page_median_ms": round(statistics.median(times), 1),
        "page_p90_ms": round(statistics.quantiles(times, n=10)[-1], 1),
        "whoami_median_ms": round(statistics.median(base), 1),
        "health_median_ms": round(statistics.median(health), 1),
        "bulk_start_desktops": len(ids),
        "bulk_start_ok": len(out.ok),
        "bulk_start_failed": len(out.failed),
        "bulk_start_s": round(bulk_s, 3),
        "targets": {"page_median_ms": 50, "bulk_start_s": 2},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
