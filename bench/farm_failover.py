"""Failover and restart in place with real LXC desktops: two nodes on one machine, one PostgreSQL (issue: farm).

``bench/farm_scale.py`` measures the farm's control plane with the fake driver; this one measures what a user
lives through with real guests:

1. restart in place (``deckard node restart``) of a node running N connected desktops: seconds until the node
   is back, and that every desktop is still running, untouched, on it;
2. ``kill -9`` of that node: seconds until its desktops are released (detected lost + fenced + released), then
   until all of them run on the other node after a start request each, and that the users' homes are intact.

Usage: ``.venv/bin/python bench/farm_failover.py [--desktops 6]`` (root; LXC and PostgreSQL 15).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time

from deckard.client import broker as qvd
from deckard.client.api import ApiClient
from deckard.client.profile import load_profile
from deckard.model.schemas import Desktop
from deckard.testing import FarmProcess, PgCluster, wait_for

PASSWORD = "bench-pass"


async def connect(farm: FarmProcess, desktop_id: int) -> None:
    """The user's first connect starts the X session; read one byte of it."""
    reader, writer = await qvd.connect(farm.broker, "bench", PASSWORD, farm.ca, desktop_id)
    await reader.readexactly(1)
    writer.close()


def rows(api: ApiClient, ids: set[int]) -> list[Desktop]:
    return [d for d in api.list_desktops() if d.id in ids]


def main(n: int) -> None:
    pg = PgCluster().init()
    farm = FarmProcess(nodes=2, extra_env={"DECKARD_DATABASE_URL": pg.create_database("bench_failover")})
    try:
        farm.up()
        profile = load_profile(farm.home / "cli-profile.json")
        api = ApiClient(profile.url, profile.token, profile.ca)
        n1, n2 = farm.node_name(1), farm.node_name(2)
        wait_for(lambda: all(x.state == "running" for x in api.list_nodes()) and len(api.list_nodes()) == 2, 60)
        farm.deckard("user", "add", "bench", "--password", PASSWORD)
        ids: set[int] = set()
        api.block_node(n1)  # every desktop on node 2
        for k in range(n):
            farm.deckard("desktop", "add", f"fo{k}", "--user", "bench")
            ids.add(int(api.get_desktop(f"fo{k}").id or 0))
            api.start_desktop(f"fo{k}")
        wait_for(lambda: all(d.state == "running" for d in rows(api, ids)), 120, 0.2, "desktops running")
        api.unblock_node(n1)
        for desktop_id in sorted(ids):
            asyncio.run(connect(farm, desktop_id))
            farm.attach(desktop_id, "echo kept > ~/kept.txt", user="bench")
        before = {d.id: (d.node, d.started_at) for d in rows(api, ids)}

        t0 = time.monotonic()
        back_s = json.loads(farm.deckard("node", "restart", n2, "--json").stdout)[0]["seconds"]
        restart_s = time.monotonic() - t0
        after = {d.id: (d.node, d.started_at) for d in rows(api, ids)}
        assert after == before, "a desktop moved or restarted during the restart in place"
        print(
            f"restart in place of a node with {n} connected desktops: back in {back_s:.1f} s "
            f"({restart_s:.1f} s with the CLI), all {n} still running untouched"
        )

        pid = int(farm.node_paths()[0].demo_node_pid(2).read_text())
        os.killpg(pid, 9)
        t0 = time.monotonic()
        wait_for(lambda: all(d.node is None for d in rows(api, ids)), 60, 0.1, "desktops released")
        released_s = time.monotonic() - t0
        for desktop_id in ids:
            api.start_desktop(desktop_id)
        wait_for(lambda: all(d.state == "running" and d.node == n1 for d in rows(api, ids)), 120, 0.1, "moved")
        running_s = time.monotonic() - t0
        for desktop_id in sorted(ids):
            asyncio.run(connect(farm, desktop_id))  # the X session (and the account) come with the connect
        homes = sum(farm.attach(i, "cat ~/kept.txt", user="bench").stdout.strip() == "kept" for i in ids)
        print(f"kill -9 of a node with {n} desktops: released after {released_s:.1f} s (detected lost, fenced)")
        print(f"  all {n} running on the other node {running_s:.1f} s after the kill; homes intact: {homes}/{n}")
        print(f"machine: {platform.node()} {os.cpu_count()} vCPUs, kernel {platform.release()}")
        api.close()
    finally:
        farm.close()
        pg.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--desktops", type=int, default=6)
    main(parser.parse_args().desktops)
