"""Two real nodes on one machine, one PostgreSQL and one storage root: an LXC desktop moved off a node killed with
``kill -9`` (fenced by the ``local`` agent, which kills the lost node's guests) with the user's home intact.
Nodes on several machines are test_farm_machines.py's; a rolling restart is tests/chaos'.

``deckard up --nodes 2 --database postgresql://…`` as a demo farm would run: node 1 is the all-in-one process
(API, broker, node), node 2 a ``deckard node`` with its own run directory (so its own guest names) and broker
port.  Placement is steered by blocking a node, as an operator would.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deckard.client import broker as qvd
from deckard.client.rfb import grab_framebuffer, is_blank
from deckard.drivers.network import link_exists, veth_name
from deckard.testing import PG_BIN, FarmProcess, PgCluster, e2e_unavailable_reason, wait_for

pytestmark = pytest.mark.e2e

PASSWORD = "n0des-pw"


@pytest.fixture(scope="module")
def farm() -> Iterator[FarmProcess]:
    reason = e2e_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15 is not installed (`make test` installs it)")
    pg = PgCluster().init()
    f = FarmProcess(nodes=2, extra_env={"DECKARD_DATABASE_URL": pg.create_database("e2e_nodes")})
    try:
        f.up()
        wait_for(lambda: _node_states(f) == {f.node_name(1): "running", f.node_name(2): "running"}, 60, 0.3, "nodes")
        f.deckard("user", "add", "nina", "--password", PASSWORD)
        yield f
    finally:
        f.close()
        pg.close()


def _node_states(farm: FarmProcess) -> dict[str, str]:
    return {n["name"]: n["state"] for n in farm.json("node", "list")}  # type: ignore[union-attr]


def _broker(farm: FarmProcess, node: int) -> str:
    return f"127.0.0.1:{farm.broker_port + node - 1}"


async def _see(farm: FarmProcess, node: int, desktop_id: int) -> None:
    """Connect through node ``node``'s broker with QVD's protocol and read a non-blank framebuffer."""
    reader, writer = await qvd.connect(_broker(farm, node), "nina", PASSWORD, farm.ca, desktop_id)
    try:
        width, _height, pixels = await asyncio.wait_for(grab_framebuffer(reader, writer, until_drawn=15), 30)
        assert width > 0 and not is_blank(pixels), "the desktop framebuffer is blank"
    finally:
        writer.close()


def _start_on(farm: FarmProcess, name: str, node: int) -> dict:
    """Create the desktop, start it on node ``node`` (the other one blocked meanwhile) and connect to it."""
    farm.deckard("desktop", "add", name, "--user", "nina")
    other = farm.node_name(2 if node == 1 else 1)
    farm.deckard("node", "block", other)
    try:
        farm.deckard("desktop", "start", name)
        desk = wait_for(lambda: (d := farm.desktop(name))["state"] == "running" and d, 90, 0.3, f"{name} running")
    finally:
        farm.deckard("node", "unblock", other)
    assert desk["node"] == farm.node_name(node), desk  # type: ignore[index]
    asyncio.run(_see(farm, node, desk["id"]))  # type: ignore[index]  # the user's X session starts at connect
    return desk  # type: ignore[return-value]


def test_kill_9_of_a_node_moves_its_desktop_elsewhere_with_the_home_intact(farm: FarmProcess) -> None:
    desk = _start_on(farm, "nina-moves", node=2)
    assert farm.attach(desk["id"], "echo still-here > ~/kept.txt", user="nina").returncode == 0
    _lxc, guest = farm.guest_of(desk["id"])
    pid = int(farm.node_paths()[0].demo_node_pid(2).read_text())
    os.killpg(pid, 9)  # the node daemon and its broker die; its LXC guests live on until fenced
    t0 = time.monotonic()

    def released() -> bool:
        d = farm.desktop("nina-moves")
        return d["state"] == "stopped" and d["node"] is None

    wait_for(released, 30, 0.3, "the lost node's desktop released")
    released_after = time.monotonic() - t0
    assert _node_states(farm)[farm.node_name(2)] == "lost"
    assert released_after < 15, f"released {released_after:.1f} s after the kill"
    # fencing killed the lost node's guest and removed what it left on the host
    assert guest not in farm.guests(farm.node_paths()[1].lxc)
    assert not link_exists(veth_name(guest))

    asyncio.run(_see(farm, 1, desk["id"]))  # the next connect starts it on node 1
    moved = farm.desktop("nina-moves")
    assert (moved["state"], moved["node"]) == ("running", farm.node_name(1)), moved
    home = farm.attach(desk["id"], "cat ~/kept.txt", user="nina")
    assert home.stdout.strip() == "still-here", home.stderr
    assert Path(farm.guest_of(desk["id"])[0]) == farm.node_paths()[0].lxc
