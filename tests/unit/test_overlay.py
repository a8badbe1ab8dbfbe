"""The overlay's pure parts: each node's address on the desktop segment and the filter of the VXLAN port."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable

import pytest

from deckard.drivers import overlay
from deckard.drivers.overlay import Segment, node_address, node_addresses, vxlan_name
from deckard.model.errors import DriverError


def test_node_addresses_count_down_from_the_top_of_the_range_and_never_meet_the_gateway() -> None:
    assert node_address("10.219.5.0/24", 1) == "10.219.5.254"
    assert node_address("10.219.5.0/24", 2) == "10.219.5.253"
    assert node_addresses("10.219.0.0/22", [3, 1, 3]) == ["10.219.3.254", "10.219.3.252"]
    with pytest.raises(DriverError) as e:
        node_address("10.219.5.0/28", 4)  # a quarter of 14 hosts: 3 node addresses at most
    assert e.value.code == "no_node_address"


def test_the_vxlan_port_name_fits_an_interface_name() -> None:
    assert vxlan_name("deckard0") == "vxdeckard0"
    assert len(vxlan_name("dke12345x7abcd")) <= 15


def test_the_overlay_filter_keeps_the_gateway_local_and_carries_only_node_traffic() -> None:
    text = Segment("deckard0", "10.231.0.0/22", 4242, "192.0.2.11", ("10.231.3.254", "10.231.3.253")).render_filter()
    assert "elements = { 10.231.3.254, 10.231.3.253 }" in text
    # ARP for the anycast gateway never crosses, in from the overlay or out to it
    assert text.count("arp daddr ip 10.231.0.1 drop") == 3
    inbound = text.split("chain in_from_overlay {")[1].split("}")[0]
    assert inbound.strip().splitlines()[-1].strip() == "drop"  # anything but node traffic and its ARP
    assert "meta mark set 0x6b76" in inbound  # a node's call is let past the desktops' egress filter


async def test_a_peer_that_leaves_takes_the_macs_learned_behind_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lost machine's flooding entry goes, and so do the desktops' MACs the port learned there: a frame for one
    floods to the live peers (the machine it starts on next) instead of going to the dead one for 300 s."""
    shown = "\n".join(
        [
            "00:00:00:00:00:00 dst 192.0.2.12 self permanent",
            "00:00:00:00:00:00 dst 192.0.2.13 self permanent",
            "54:52:00:d4:ea:0f dst 192.0.2.12 self",  # learned behind the machine that leaves
            "54:52:00:d4:ea:0e dst 192.0.2.13 self",  # behind one that stays
            "54:52:00:d4:ea:0d dst 192.0.2.12 self permanent",  # put there by hand: not ours to drop
            "54:52:00:d4:ea:0f master dke1",  # the bridge's own entry (the port, not a machine)
        ]
    )
    commands: list[list[str]] = []
    batches: list[tuple[str, list[str]]] = []

    async def run(argv: list[str], **_options: object) -> subprocess.CompletedProcess[str]:
        commands.append(argv)
        return subprocess.CompletedProcess(argv, 0, shown if argv[:2] == ["bridge", "fdb"] and "show" in argv else "")

    async def batch(program: str, lines: Iterable[str]) -> None:
        batches.append((program, list(lines)))

    monkeypatch.setattr(overlay, "run_command", run)
    monkeypatch.setattr(overlay, "run_batch", batch)
    await overlay.set_peers("vxdke1", ["192.0.2.13", "192.0.2.14"])
    assert ["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vxdke1", "dst", "192.0.2.14"] in commands
    assert ["bridge", "fdb", "del", "00:00:00:00:00:00", "dev", "vxdke1", "dst", "192.0.2.12"] in commands
    assert batches == [("bridge", ["fdb del 54:52:00:d4:ea:0f dev vxdke1 self"])]
