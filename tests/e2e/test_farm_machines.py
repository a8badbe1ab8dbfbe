"""A farm across machines: ``deckard up --machines 3`` on this box, real LXC desktops on the farm's VXLAN segment.

Each machine is a network namespace with its own underlay address, desktop bridge, filter and node
(runtime/machines.py); the API, the database and the storage stay on the host.  A desktop keeps its address on
whichever machine it runs, any machine's broker reaches it over the overlay, and the overlay carries only node ↔
desktop traffic: desktops on two machines do not reach each other, nor another machine's node.  Desktops of two
tenant networks with the same range, on two machines, are reached at their farm addresses and reach nothing of
each other.  A machine that loses power is fenced through its simulated BMC (``ipmi_sim``, ``fence_ipmilan``) and
its desktops start on another machine with their address and home.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from deckard.client import broker as qvd
from deckard.client.rfb import grab_framebuffer, is_blank
from deckard.drivers.overlay import node_address, vxlan_name
from deckard.model.network import gateway_of, mac_for_ip
from deckard.testing import PG_BIN, FarmProcess, PgCluster, e2e_unavailable_reason, wait_for

pytestmark = pytest.mark.e2e

PASSWORD = "mach1nes-pw"
MACHINES = 3


@pytest.fixture(scope="module")
def farm() -> Iterator[FarmProcess]:
    reason = e2e_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15 is not installed (`make test` installs it)")
    pg = PgCluster().init()
    pg.create_database("e2e_machines")
    f = FarmProcess(machines=MACHINES, extra_env={"DECKARD_DATABASE_URL": pg.socket_url("e2e_machines")})
    try:
        f.up()
        names = {f.machine_node(i) for i in range(1, MACHINES + 1)}
        wait_for(lambda: _node_states(f) == dict.fromkeys(names, "running"), 60, 0.3, "every machine's node")
        f.deckard("user", "add", "mia", "--password", PASSWORD)
        yield f
    finally:
        f.close()
        pg.close()


def _node_states(farm: FarmProcess) -> dict[str, str]:
    return {n["name"]: n["state"] for n in farm.json("node", "list")}  # type: ignore[union-attr]


def _broker(farm: FarmProcess, machine: int) -> str:
    return f"{farm.machine(machine).address}:{farm.broker_port}"


async def _see(farm: FarmProcess, machine: int, desktop_id: int) -> None:
    """Connect through machine ``machine``'s broker with QVD's protocol and read a non-blank framebuffer."""
    reader, writer = await qvd.connect(_broker(farm, machine), "mia", PASSWORD, farm.ca, desktop_id)
    try:
        width, _height, pixels = await asyncio.wait_for(grab_framebuffer(reader, writer, until_drawn=15), 30)
        assert width > 0 and not is_blank(pixels), "the desktop framebuffer is blank"
    finally:
        writer.close()


def _start_on(farm: FarmProcess, name: str, machine: int, *options: str) -> dict:
    """The desktop (made if new, with ``options``) running on machine ``machine`` (started with the others
    blocked meanwhile)."""
    desks = {d["name"]: d for d in farm.json("desktop", "list")}  # type: ignore[union-attr]
    if name not in desks:
        farm.deckard("desktop", "add", name, "--user", "mia", *options)
    elif (desks[name]["state"], desks[name]["node"]) == ("running", farm.machine_node(machine)):
        return desks[name]  # type: ignore[no-any-return]
    others = [farm.machine_node(i) for i in range(1, MACHINES + 1) if i != machine]
    for other in others:
        farm.deckard("node", "block", other)
    try:
        farm.deckard("desktop", "start", name)
        desk = wait_for(lambda: (d := farm.desktop(name))["state"] == "running" and d, 90, 0.3, f"{name} running")
    finally:
        for other in others:
            farm.deckard("node", "unblock", other)
    assert desk["node"] == farm.machine_node(machine), desk  # type: ignore[index]
    return desk  # type: ignore[return-value]


def test_each_machines_broker_reaches_the_desktops_of_the_other_over_the_overlay(farm: FarmProcess) -> None:
    here, there = _start_on(farm, "mia-one", 1), _start_on(farm, "mia-two", 2)
    asyncio.run(_see(farm, 2, here["id"]))  # machine 2's broker → the desktop on machine 1, and the reverse
    asyncio.run(_see(farm, 1, there["id"]))
    assert farm.guest_of(there["id"])[0] == farm.node_paths()[1].lxc  # it does run on machine 2


def test_desktops_on_two_machines_reach_neither_each_other_nor_the_other_node(farm: FarmProcess) -> None:
    one, two = _start_on(farm, "mia-one", 1), _start_on(farm, "mia-two", 2)
    gateway = gateway_of(farm.network)
    assert farm.probe(one["id"], gateway, 53) == "open"  # its own node's resolver: the probe can say open
    assert farm.probe(one["id"], two["ip"], 3030).startswith("blocked")  # the other desktop's agent
    node_ids = {n["name"]: n["id"] for n in farm.json("node", "list")}  # type: ignore[union-attr]
    other_node = node_address(farm.network, node_ids[farm.machine_node(2)])
    assert farm.probe(one["id"], other_node, farm.broker_port).startswith("blocked")
    assert farm.probe(one["id"], farm.machine(2).address, farm.broker_port).startswith("blocked")


def test_tenant_networks_with_one_range_on_two_machines_are_reached_by_farm_address_and_isolated(
    farm: FarmProcess,
) -> None:
    """A private and a shared network with the same range (both usable by the default tenant), a desktop of each
    on its own machine: every machine's broker reaches both (by farm address, over the overlay); neither reaches
    the other, by farm address or by its address in the range."""
    farm.deckard("network", "create", "lan", "--range", "10.88.0.0/24")
    farm.deckard("network", "create", "corp", "--range", "10.88.0.0/24", "--shared")
    farm.deckard("network", "grant", "corp", "default")
    lan = _start_on(farm, "mia-lan", 1, "--network", "lan")
    corp = _start_on(farm, "mia-corp", 3, "--network", "corp")
    assert lan["network_ip"] == corp["network_ip"] == "10.88.0.11" and lan["ip"] != corp["ip"]
    asyncio.run(_see(farm, 3, lan["id"]))
    asyncio.run(_see(farm, 1, corp["id"]))
    asyncio.run(_see(farm, 2, corp["id"]))  # a machine that has neither network
    assert farm.probe(lan["id"], "10.88.0.1", 53) == "open"  # its gateway's DNS: the probe can say open
    for host, port in [(corp["ip"], 3030), ("10.88.0.12", 3030), (gateway_of(farm.network), farm.api_port)]:
        assert farm.probe(lan["id"], host, port).startswith("blocked"), (host, port)


def test_a_machine_powered_off_is_fenced_and_its_desktop_starts_on_the_other_with_address_and_home(
    farm: FarmProcess,
) -> None:
    desk = _start_on(farm, "mia-lost", 2)
    asyncio.run(_see(farm, 1, desk["id"]))
    assert farm.attach(desk["id"], "echo survived-the-machine > ~/lost.txt", user="mia").returncode == 0
    farm.machine(2).power_off()  # every process of machine 2 at once: its node, broker, LXC monitors, desktops
    t0 = time.monotonic()
    wait_for(lambda: _node_states(farm)[farm.machine_node(2)] == "lost", 30, 0.3, "machine 2's node declared lost")
    wait_for(lambda: farm.desktop("mia-lost")["node"] is None, 30, 0.3, "its desktop released once fenced")
    released_after = time.monotonic() - t0
    lost = next(n for n in farm.json("node", "list") if n["name"] == farm.machine_node(2))  # type: ignore[union-attr]
    # fenced through its BMC (ipmi_sim, runtime/bmc.py) with fence_ipmilan, the power-off confirmed, then released
    assert lost["fence_agent"] == "fence_ipmilan" and lost["lost_reason"].startswith("fenced"), lost
    # the live machines' overlay forgets where the desktop's MAC was (the port had learned it at machine 2) at its
    # next pass (every 2 s): the first frames to it, wherever it starts, flood to the live machines instead of going
    # to a dead one
    behind = f"{mac_for_ip(desk['ip'])} dst {farm.machine(2).address} "
    for machine in (1, 3):

        def forgotten(machine: int = machine) -> bool:
            fdb = farm.machine(machine).run("bridge", "fdb", "show", "dev", vxlan_name(farm.bridge)).stdout
            return behind not in fdb

        wait_for(forgotten, 10, 0.2, f"machine {machine}'s overlay to forget the desktop's MAC behind machine 2")
    asyncio.run(_see(farm, 1, desk["id"]))  # the next connect starts it on another machine
    moved = farm.desktop("mia-lost")
    assert (moved["state"], moved["ip"]) == ("running", desk["ip"]) and moved["node"] != farm.machine_node(2), moved
    home = farm.attach(desk["id"], "cat ~/lost.txt", user="mia")
    assert home.stdout.strip() == "survived-the-machine", home.stderr
    print(f"machine 2 lost → desktop released {released_after:.1f} s later")
