"""A farm across machines (issue 15): a whole machine lost, and the broker's tunnel over the overlay.

``deckard up --machines 2`` on this box (``deckard.runtime.machines``: network and mount namespaces, one node each,
the desktop network a VXLAN segment across them) on PostgreSQL, with real LXC desktops of the minimal image.

* **Machine loss**: ``--desktops`` desktops (default 4, each of its own user, a file written in each home) run on
  machine 2; machine 2 is powered off (every process at once: node, broker, LXC monitors, desktops).  Timed from
  the power-off: the node declared lost (no heartbeat for ``node.lost_after_s``), fenced (the demo's power switch
  confirms the machine is off) and its desktops released; each released desktop is started again at once (as the
  user's reconnect would) and counts once it runs on machine 1 with its home file readable.
  Target: **all running elsewhere ≤ 15 s, homes intact**.
* **Tunnel over the overlay**: a viewer asks Xvnc for full-screen Raw updates as fast as they come
  (``bench/_rfb.py``) through the QVD-protocol TLS broker of machine 2 (the desktop's own machine) and of machine 1
  (over the VXLAN segment), alternating, ``--runs`` times ``--seconds`` each.  Target: **overlay ≥ 70 % of the
  same-machine tunnel's MB/s**.

Usage: ``.venv/bin/python bench/farm_machines.py [--desktops 4] [--seconds 4] [--runs 3] [--json]`` (root).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from typing import Any

from _rfb import RawViewer, stream_io  # bench/_rfb.py
from deckard.cli.session import open_client
from deckard.client.broker import connect
from deckard.testing import PG_BIN, FarmProcess, PgCluster, e2e_unavailable_reason, wait_for

PASSWORD = "bench-machines-pw"


def _start_on(farm: FarmProcess, api: Any, names: list[str], machine: int) -> None:
    """Start the desktops with the other machine blocked, and wait until they all run."""
    other = farm.machine_node(2 if machine == 1 else 1)
    farm.deckard("node", "block", other)
    try:
        for name in names:
            api.desktop_action(name, "start")
        wait_for(lambda: all(api.get_desktop(n).state == "running" for n in names), 120, 0.3, "the desktops to run")
    finally:
        farm.deckard("node", "unblock", other)


async def _tunnel(farm: FarmProcess, machine: int, login: str, desktop_id: int, seconds: float) -> float:
    server = f"{farm.machine(machine).address}:{farm.broker_port}"
    reader, writer = await connect(server, login, PASSWORD, farm.ca, desktop_id)
    try:
        viewer = RawViewer(*stream_io(reader, writer))
        await viewer.handshake()
        await viewer.stream(0.5)  # warm-up
        got, took = await viewer.stream(seconds)
        return got / took / 1e6
    finally:
        writer.close()


def machine_loss(farm: FarmProcess, api: Any, count: int) -> dict[str, Any]:
    names = [f"lost{i}" for i in range(count)]
    for name in names:
        farm.user_with_desktop(name, PASSWORD, name)
    _start_on(farm, api, names, 2)
    ids = {name: api.get_desktop(name).id for name in names}
    for name, desktop_id in ids.items():  # the account (and home) exists once the user has connected
        asyncio.run(_tunnel(farm, 2, name, desktop_id, 0.1))
        farm.attach(desktop_id, f"echo home-of-{name} > ~/kept.txt", user=name)
    farm.machine(2).power_off()
    t0 = time.monotonic()
    moved: dict[str, float] = {}
    released: dict[str, float] = {}
    while len(moved) < count and time.monotonic() - t0 < 120:
        for name in names:
            if name in moved:
                continue
            desk = api.get_desktop(name)
            if desk.node_id is None and desk.state == "stopped" and name not in released:
                released[name] = time.monotonic() - t0
                api.desktop_action(name, "start")  # the user's reconnect
            elif desk.state == "running" and name in released:
                moved[name] = time.monotonic() - t0
        time.sleep(0.1)
    intact = 0
    for name in moved:  # the user connects again (their account is made in the new guest at connect)
        asyncio.run(_tunnel(farm, 1, name, ids[name], 0.1))
        intact += farm.attach(ids[name], "cat ~/kept.txt", user=name).stdout.strip() == f"home-of-{name}"
    return {
        "desktops": count,
        "released_s": round(max(released.values(), default=float("nan")), 2),
        "all_running_elsewhere_s": round(max(moved.values()), 2) if len(moved) == count else None,
        "homes_intact": intact,
    }


def tunnel(farm: FarmProcess, api: Any, seconds: float, runs: int) -> dict[str, Any]:
    farm.user_with_desktop("viewer", PASSWORD, "viewer-desk")
    _start_on(farm, api, ["viewer-desk"], 2)
    desktop_id = api.get_desktop("viewer-desk").id
    same, overlay = [], []
    for _ in range(runs):
        same.append(asyncio.run(_tunnel(farm, 2, "viewer", desktop_id, seconds)))
        overlay.append(asyncio.run(_tunnel(farm, 1, "viewer", desktop_id, seconds)))
    same_mb, overlay_mb = statistics.median(same), statistics.median(overlay)
    return {
        "same_machine_mb_s": round(same_mb, 1),
        "overlay_mb_s": round(overlay_mb, 1),
        "overlay_ratio": round(overlay_mb / same_mb, 2),
        "runs": runs,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--desktops", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reason = e2e_unavailable_reason() or (None if (PG_BIN / "initdb").exists() else "PostgreSQL 15 is missing")
    if reason:
        raise SystemExit(f"farm_machines: {reason}")
    pg = PgCluster().init()
    pg.create_database("bench_machines")
    farm = FarmProcess(machines=2, extra_env={"DECKARD_DATABASE_URL": pg.socket_url("bench_machines")})
    try:
        farm.up()
        with open_client(farm.home / "cli-profile.json") as api:
            names = {farm.machine_node(1), farm.machine_node(2)}
            wait_for(lambda: {n.name for n in api.list_nodes() if n.state == "running"} == names, 60, 0.3, "nodes")
            result = {
                "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, "
                f"{len(__import__('os').sched_getaffinity(0))} CPUs)",
                "tunnel": tunnel(farm, api, args.seconds, args.runs),
                "machine_loss": machine_loss(farm, api, args.desktops),
            }
    finally:
        farm.close()
        pg.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    t, loss = result["tunnel"], result["machine_loss"]
    print(f"farm_machines on {result['machine']}")
    print(
        f"  tunnel through the broker: same machine {t['same_machine_mb_s']} MB/s, over the overlay "
        f"{t['overlay_mb_s']} MB/s = {t['overlay_ratio']:.2f}x (target >= 0.70)"
    )
    print(
        f"  machine 2 powered off with {loss['desktops']} desktops: released after {loss['released_s']} s, all "
        f"running on machine 1 after {loss['all_running_elsewhere_s']} s (target <= 15 s), homes intact "
        f"{loss['homes_intact']}/{loss['desktops']}"
    )


if __name__ == "__main__":
    main()
