"""Tenant networks' data plane on one machine, with real namespaces, bridges and nftables (no farm, no LXC).

Two tenant networks with the **same** range, one "desktop" on each (a network namespace of its own on the
network's bridge, as a container's veth would be), behind a farm bridge with the farm's own filter loaded: the
node reaches each desktop at its farm address and finds the right one; each desktop reaches its gateway's DNS
(the farm gateway's resolver, seeing the desktop's farm address) and nothing of the other.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from deckard.drivers import firewall, tenant_net
from deckard.drivers.network import ensure_bridge, remove_bridge
from deckard.model.egress import Protected, parse_policy

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nftables (network namespaces, bridges)"
)

RANGE = "10.77.0.0/24"  # both tenants'
SERVICE_PORT = 7000
SERVER = (
    "import socket,sys\n"
    "s=socket.create_server(('0.0.0.0',7000))\n"
    "while True:\n"
    "  c,_=s.accept(); c.sendall(sys.argv[1].encode()); c.close()\n"
)
PROBE = (
    "import socket,sys\n"
    "try:\n"
    "  c=socket.create_connection((sys.argv[1],int(sys.argv[2])),2); print(c.recv(64).decode() or 'open')\n"
    "except OSError as e: print('closed', e)\n"
)
PING = (  # an ICMP echo (the host has no ping)
    "import socket,struct,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_ICMP); s.settimeout(2)\n"
    "h=struct.pack('!BBHHH',8,0,0,7,1); c=sum(struct.unpack('!4H',h))\n"
    "c=(c>>16)+(c&0xffff); c=~(c+(c>>16))&0xffff\n"
    "s.sendto(struct.pack('!BBHHH',8,0,c,7,1),(sys.argv[1],0))\n"
    "try:\n"
    "  while True:\n"
    "    d,a=s.recvfrom(128)\n"
    "    if a[0]==sys.argv[1] and d[20]==0: print('echo reply'); break\n"
    "except OSError as e: print('no reply', e)\n"
)
DNS_PROBE = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(2)\n"
    "s.sendto(b'hello',(sys.argv[1],53))\n"
    "try: print(s.recv(64).decode())\n"
    "except OSError as e: print('no answer', e)\n"
)


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30).stdout


@dataclass
class Plane:
    farm_bridge: str
    farm_range: str
    networks: dict[int, tuple[tenant_net.TenantNetwork, tenant_net.Names]]
    desktops: dict[str, str]  # desktop netns → its farm address
    servers: list[subprocess.Popen[bytes]]

    def in_desktop(self, ns: str, code: str, *args: str) -> str:
        return sh("ip", "netns", "exec", ns, sys.executable, "-c", code, *args).strip()


def _desktop(ns: str, port: str, bridge: str, address: str, gateway: str) -> None:
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "link", "set", port, "master", bridge, "up")
    sh("bridge", "link", "set", "dev", port, "isolated", "on")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
    sh("ip", "-n", ns, "route", "add", "default", "via", gateway)


@pytest.fixture(scope="module")
def plane() -> Iterator[Plane]:
    tag = uuid.uuid4().hex[:6]
    farm_bridge = f"dkf{tag}"
    third = int(tag[:2], 16) % 200 + 20
    farm_range = f"10.{third}.0.0/16"
    farm_gw = str(ipaddress.IPv4Network(farm_range).network_address + 1)
    made: list[str] = []
    servers: list[subprocess.Popen[bytes]] = []
    networks = {}
    desktops = {}
    try:
        asyncio.run(ensure_bridge(farm_bridge, f"{farm_gw}/16"))
        allow = parse_policy("allow any")
        farm_ips = {1: str(ipaddress.IPv4Network(farm_range).network_address + 2011), 2: "", 3: ""}
        farm_ips[2] = str(ipaddress.IPv4Address(farm_ips[1]) + 1)
        protected = Protected(ipaddress.IPv4Network(farm_range), ipaddress.IPv4Address(farm_gw))
        table = firewall.Table(farm_bridge, protected, {farm_ips[1]: allow, farm_ips[2]: allow})
        asyncio.run(firewall.load(farm_bridge, table.render()))
        for network_id in (1, 2):
            net = tenant_net.TenantNetwork(network_id, RANGE, farm_bridge, farm_range)
            names = tenant_net.names(farm_bridge, "n1", network_id)
            networks[network_id] = (net, names)
            asyncio.run(tenant_net.ensure(net, names))
            asyncio.run(tenant_net.ensure(net, names))  # idempotent
            asyncio.run(tenant_net.apply(net, names, {farm_ips[network_id]: "10.77.0.11"}))
            ns = f"dkd{tag}{network_id}"
            made.append(ns)
            _desktop(ns, f"dkp{tag}{network_id}", names.bridge, "10.77.0.11", "10.77.0.1")
            desktops[ns] = farm_ips[network_id]
            servers.append(
                subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, f"desktop-{network_id}"])
            )
        yield Plane(farm_bridge, farm_range, networks, desktops, servers)
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        for tag_port in (f"dkp{tag}1", f"dkp{tag}2"):
            subprocess.run(["ip", "link", "del", tag_port], check=False, capture_output=True)
        for _net, names in networks.values():
            asyncio.run(tenant_net.remove(names))
        asyncio.run(firewall.remove(farm_bridge))
        asyncio.run(remove_bridge(farm_bridge))
    assert tenant_net.existing(farm_bridge, "n1") == set()


def _read(address: str) -> str:
    for _ in range(30):  # the desktop's server may still be starting
        try:
            with socket.create_connection((address, SERVICE_PORT), 2) as c:
                return c.recv(64).decode()
        except OSError:
            threading.Event().wait(0.1)
    return "unreachable"


def test_the_node_reaches_each_desktop_at_its_farm_address(plane: Plane) -> None:
    farm_1, farm_2 = plane.desktops.values()
    assert _read(farm_1) == "desktop-1"
    assert _read(farm_2) == "desktop-2"


def test_a_desktop_reaches_its_gateway_and_the_farm_resolver_sees_its_farm_address(plane: Plane) -> None:
    farm_gw = str(ipaddress.IPv4Network(plane.farm_range).network_address + 1)
    seen: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as resolver:
        resolver.bind((farm_gw, 53))
        resolver.settimeout(5)

        def answer() -> None:
            try:
                data, peer = resolver.recvfrom(64)
                seen.append(peer[0])
                resolver.sendto(b"answer:" + data, peer)
            except OSError:
                pass

        for ns, farm_ip in plane.desktops.items():
            t = threading.Thread(target=answer)
            t.start()
            assert plane.in_desktop(ns, DNS_PROBE, "10.77.0.1") == "answer:hello"
            t.join()
            assert seen[-1] == farm_ip
            assert plane.in_desktop(ns, PING, "10.77.0.1") == "echo reply"


def test_a_desktop_reaches_nothing_of_the_other_network_or_the_node(plane: Plane) -> None:
    (ns_1, farm_1), (_ns_2, farm_2) = plane.desktops.items()
    # the other tenant's desktop at its farm address: the farm filter rejects desktop → desktop
    assert plane.in_desktop(ns_1, PROBE, farm_2, str(SERVICE_PORT)).startswith("closed")
    # itself at its farm address, and the node's other services on the farm gateway
    farm_gw = str(ipaddress.IPv4Network(plane.farm_range).network_address + 1)
    assert plane.in_desktop(ns_1, PROBE, farm_gw, "22").startswith("closed")
    # the namespace itself offers nothing on its legs
    assert plane.in_desktop(ns_1, PROBE, "10.77.0.1", "22").startswith("closed")
    assert farm_1 != farm_2


def test_a_desktop_gone_from_the_map_is_unreachable_and_back_when_mapped(plane: Plane) -> None:
    net, names = plane.networks[2]
    farm_2 = list(plane.desktops.values())[1]
    asyncio.run(tenant_net.apply(net, names, {}))
    try:
        with pytest.raises(OSError):
            socket.create_connection((farm_2, SERVICE_PORT), 1).close()
    finally:
        asyncio.run(tenant_net.apply(net, names, {farm_2: "10.77.0.11"}))
    assert _read(farm_2) == "desktop-2"
