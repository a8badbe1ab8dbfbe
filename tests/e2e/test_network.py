"""Desktops reach out through their node under the egress policy, with DNS, and never reach the farm.

The "internet" is a network namespace this module builds (``Upstream``): a web server and a DNS zone behind a
veth pair, so no packet leaves the machine.  The farm's resolver forwards to the upstream's DNS.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from deckard.client import broker as qvd
from deckard.client.rfb import colour_share, grab_framebuffer
from deckard.drivers.firewall import table_name
from deckard.model.network import gateway_of
from deckard.testing import FarmProcess, Upstream, e2e_unavailable_reason, wait_for

PASSWORD = "net-Pa55word!"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    reason = e2e_unavailable_reason()
    if reason:
        pytest.skip(reason)
    up = Upstream()
    try:
        yield up.start()
    finally:
        up.close()


@pytest.fixture(scope="module")
def farm(upstream: Upstream) -> Iterator[FarmProcess]:
    f = FarmProcess(extra_env={"DECKARD_NETWORK__DNS_SERVERS": json.dumps([upstream.ip])})
    try:
        f.up()
        yield f
    finally:
        f.close()


def _running(farm: FarmProcess, name: str, user: str) -> dict:
    if not any(d["name"] == name for d in farm.json("desktop", "list")):  # type: ignore[union-attr]
        farm.deckard("user", "add", user, "--password", PASSWORD)
        farm.deckard("desktop", "add", name, "--user", user)
    if farm.desktop(name)["state"] != "running":
        farm.deckard("desktop", "start", name)
    return wait_for(  # type: ignore[return-value]
        lambda: (d := farm.desktop(name))["state"] == "running" and d, 60, 0.2, f"{name} to run"
    )


def _fetch(farm: FarmProcess, desktop_id: int, url: str, marker: str = "Deckard upstream page") -> str:
    code = (
        "import urllib.request\n"
        f"try: body = urllib.request.urlopen('{url}', timeout=3).read()\n"
        "except Exception as e: print('failed', type(e).__name__, e)\n"
        f"else: print('page' if b'{marker}' in body else 'other')\n"
    )
    out = farm.attach(desktop_id, f'python3 -c "{code}"')
    return out.stdout.strip() or out.stderr.strip()


def test_a_desktop_resolves_names_and_fetches_a_page_from_upstream(farm: FarmProcess, upstream: Upstream) -> None:
    desk = _running(farm, "net-a", "neta")
    resolv = farm.attach(desk["id"], "cat /etc/resolv.conf").stdout
    assert f"nameserver {gateway_of(farm.network)}" in resolv
    assert _fetch(farm, desk["id"], f"http://www.{upstream.zone}:8080/") == "page"


def test_a_deny_rule_added_while_the_desktop_runs_blocks_within_5_s_and_explain_names_it(
    farm: FarmProcess, upstream: Upstream
) -> None:
    desk = _running(farm, "net-a", "neta")
    assert farm.probe(desk["id"], upstream.ip, 8080) == "open"
    policy = f"deny tcp {upstream.ip} port 8080; allow any"
    farm.deckard("config", "set", "network.egress", policy, "--osf", "default")
    t0 = time.monotonic()
    wait_for(lambda: farm.probe(desk["id"], upstream.ip, 8080).startswith("blocked"), 5, 0.2, "the deny rule")
    elapsed = time.monotonic() - t0
    assert farm.probe(desk["id"], upstream.ip, 8081) == "open"  # only what the rule names is cut
    why = farm.json("desktop", "explain-network", "net-a", upstream.ip, "--port", "8080")
    assert why == {**why, "allowed": False, "decided_by": "rule", "rule_index": 1, "policy_source": "osf"}  # type: ignore[dict-item]
    assert farm.json("desktop", "explain-network", "net-a", upstream.ip, "--port", "8081")["rule_index"] == 2  # type: ignore[index]
    farm.deckard("config", "reset", "network.egress", "--osf", "default")
    wait_for(lambda: farm.probe(desk["id"], upstream.ip, 8080) == "open", 5, 0.2, "the rule to be lifted")
    assert elapsed < 5


def test_a_desktop_never_reaches_another_desktop_or_the_nodes_services(farm: FarmProcess, upstream: Upstream) -> None:
    a = _running(farm, "net-a", "neta")
    b = _running(farm, "net-b", "netb")
    gateway = gateway_of(farm.network)
    for host, port in [
        (b["ip"], 3030),  # another desktop's agent
        (b["ip"], 5900),  # and its display
        (gateway, farm.api_port),  # the node on the bridge: API, broker
        (gateway, farm.broker_port),
        (upstream.host_ip, farm.api_port),  # the node's other addresses
    ]:
        assert farm.probe(a["id"], host, port).startswith("blocked"), (host, port)
    why = farm.json("desktop", "explain-network", "net-a", b["ip"], "--port", "3030")
    assert why["decided_by"] == "farm" and not why["allowed"]  # type: ignore[index]


def test_a_node_restart_loads_the_filter_again_before_it_adopts_its_desktops(
    farm: FarmProcess, upstream: Upstream
) -> None:
    """The filter is gone (flushed by hand); the node restarts in place; its desktop comes back under its policy:
    the denied port stays closed and the allowed one works again (through the masquerade the table holds)."""
    desk = _running(farm, "net-a", "neta")
    farm.deckard("config", "set", "network.egress", f"deny tcp {upstream.ip} port 8080", "--osf", "default")
    try:
        wait_for(lambda: farm.probe(desk["id"], upstream.ip, 8080).startswith("blocked"), 5, 0.2, "the deny rule")
        subprocess.run(["nft", "delete", "table", "inet", table_name(farm.bridge)], check=True)
        assert farm.probe(desk["id"], upstream.ip, 8081).startswith("blocked")  # no table: no way out at all
        farm.deckard("node", "restart", farm.node_name(1), "--timeout", "60")
        assert farm.desktop("net-a")["state"] == "running"  # adopted, not restarted
        assert farm.probe(desk["id"], upstream.ip, 8081) == "open"
        assert farm.probe(desk["id"], upstream.ip, 8080).startswith("blocked")
    finally:
        farm.deckard("config", "reset", "network.egress", "--osf", "default")


def test_a_policy_that_would_open_the_farm_or_does_not_parse_is_refused(farm: FarmProcess) -> None:
    out = farm.deckard("config", "set", "network.egress", f"allow {farm.network}", check=False)
    assert out.returncode != 0 and "egress_opens_farm" in out.stdout + out.stderr
    out = farm.deckard("config", "set", "network.egress", "allow tcp any port 99999", check=False)
    assert out.returncode != 0 and "bad_egress_policy" in out.stdout + out.stderr
    assert farm.json("config", "get", "network.egress")[0]["value"] == ""  # type: ignore[index]


GREEN = (0x1F, 0x7A, 0x3A)  # the upstream page's background (Upstream.page)


def test_firefox_in_a_standard_desktop_shows_a_page_served_upstream(
    farm: FarmProcess, upstream: Upstream, standard_image: Path
) -> None:
    """The standard profile's Firefox opens a page by name from the upstream namespace; the screen (read through
    the broker, as a client sees it) is mostly that page's colour."""
    farm.deckard("image", "import", str(standard_image), "--home", str(farm.home), "--tag", "standard")
    farm.deckard("user", "add", "fiona", "--password", PASSWORD)
    farm.deckard("desktop", "add", "net-ff", "--user", "fiona", "--tag", "standard")
    desk = _running(farm, "net-ff", "fiona")
    url = f"http://www.{upstream.zone}:8080/"

    async def look() -> float:
        reader, writer = await qvd.connect(farm.broker, "fiona", PASSWORD, farm.ca, desk["id"])
        try:
            launch = f"DISPLAY=:0 setsid firefox-esr --kiosk {url} >/tmp/firefox.log 2>&1 &"
            out = await asyncio.to_thread(farm.attach, desk["id"], launch, "fiona")
            assert out.returncode == 0, out
            _w, _h, pixels = await asyncio.wait_for(
                grab_framebuffer(reader, writer, until_drawn=60, drawn=lambda px: colour_share(px, GREEN) > 0.5), 90
            )
            return colour_share(pixels, GREEN)
        finally:
            writer.close()

    share = asyncio.run(look())
    log = farm.attach(desk["id"], "tail -n 20 /tmp/firefox.log").stdout
    assert share > 0.5, f"the page covers {share:.0%} of the screen; firefox said:\n{log}"


# ---- tenant networks (drivers/tenant_net.py): last in the module, as they make the farm multi-tenant ----------
TENANT_RANGE = "10.88.0.0/24"


def _tenant_desktop(farm: FarmProcess, minimal_image: Path, tenant: str, user: str) -> dict:
    """A running desktop of ``tenant`` on its private network ``lan`` (TENANT_RANGE, the same for every tenant)."""
    name = f"{user}-desk"
    if not any(d["name"] == name for d in farm.json("desktop", "list")):  # type: ignore[union-attr]
        farm.deckard("config", "set", "tenancy.multi", "true")
        farm.deckard("tenant", "add", tenant)
        farm.deckard("image", "import", str(minimal_image), "--osf", f"default@{tenant}")
        farm.deckard("network", "create", "lan", "--range", TENANT_RANGE, "--tenant", tenant)
        farm.deckard("user", "add", user, "--password", PASSWORD, "--tenant", tenant)
        users: Any = farm.json("user", "list")
        user_id = next(u["id"] for u in users if u["login"] == user)
        farm.deckard("desktop", "add", name, "--user", str(user_id), "--network", "lan")
    if farm.desktop(name)["state"] != "running":
        farm.deckard("desktop", "start", name)
    return wait_for(  # type: ignore[return-value]
        lambda: (d := farm.desktop(name))["state"] == "running" and d, 60, 0.2, f"{name} to run"
    )


def test_two_tenants_with_the_same_range_each_reach_out_and_never_each_other(
    farm: FarmProcess, upstream: Upstream, minimal_image: Path
) -> None:
    a = _tenant_desktop(farm, minimal_image, "acme", "ann")
    b = _tenant_desktop(farm, minimal_image, "beta", "bob")
    assert a["network_ip"] == b["network_ip"] == "10.88.0.11" and a["ip"] != b["ip"]
    for desk in (a, b):
        inside = farm.attach(desk["id"], "cat /etc/resolv.conf /proc/net/fib_trie").stdout
        assert "nameserver 10.88.0.1" in inside and "10.88.0.11" in inside and desk["ip"] not in inside
        assert _fetch(farm, desk["id"], f"http://www.{upstream.zone}:8080/") == "page"  # DNS and egress
    gateway = gateway_of(farm.network)
    for host, port in [
        (b["ip"], 3030),  # the other tenant's desktop, at its farm address
        (gateway, farm.api_port),  # the node's services
        ("10.88.0.1", 22),  # its own network's gateway offers nothing but DNS
    ]:
        assert farm.probe(a["id"], host, port).startswith("blocked"), (host, port)


def test_the_broker_reaches_a_tenant_desktop_at_its_farm_address(farm: FarmProcess, minimal_image: Path) -> None:
    desk = _tenant_desktop(farm, minimal_image, "acme", "ann")

    async def look() -> tuple[int, int]:
        reader, writer = await qvd.connect(farm.broker, "ann@acme", PASSWORD, farm.ca, desk["id"])
        try:
            width, height, _pixels = await asyncio.wait_for(grab_framebuffer(reader, writer), 30)
            return width, height
        finally:
            writer.close()

    width, height = asyncio.run(look())
    assert width > 0 and height > 0


# ---- flat networks: a network of the machines' own (here a veth standing for the node's NIC) -------------------
FLAT_RANGE = "10.89.20.0/24"
PROVIDER_PAGE = "Deckard provider page"


def _vlan_unsupported() -> str | None:
    """Why VLAN interfaces cannot be made here (this kernel lacks 802.1Q), or None."""
    probe = f"dkvq{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "link", "add", probe, "type", "veth", "peer", "name", f"{probe}p"], capture_output=True)
    try:
        made = subprocess.run(
            ["ip", "link", "add", "link", probe, "name", f"{probe}.9", "type", "vlan", "id", "9"],
            capture_output=True,
            text=True,
        )
        return None if made.returncode == 0 else f"the kernel has no 802.1Q VLAN support: {made.stderr.strip()}"
    finally:
        subprocess.run(["ip", "link", "del", probe], capture_output=True)


@contextmanager
def _provider(vlan: int | None) -> Iterator[str]:
    """A provider network behind a node interface (tagged ``vlan``): a namespace with its router (.1) serving a
    page.  Yields the node interface's name."""
    tag = uuid.uuid4().hex[:6]
    ns, nic = f"dkprov{tag}", f"dkpi{tag}"
    inner = "eth0" if vlan is None else f"eth0.{vlan}"
    root = Path(tempfile.mkdtemp(prefix="deckard-provider-"))
    (root / "index.html").write_text(f"<html><body>{PROVIDER_PAGE}</body></html>")
    server = None
    try:
        setup = [
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", nic, "type", "veth", "peer", "name", "eth0", "netns", ns],
            ["ip", "-n", ns, "link", "set", "dev", "eth0", "up"],
            ["ip", "-n", ns, "link", "set", "dev", "lo", "up"],
        ]
        if vlan is not None:
            setup.append(
                ["ip", "-n", ns, "link", "add", "link", "eth0", "name", inner, "type", "vlan", "id", str(vlan)]
            )
        setup += [
            ["ip", "-n", ns, "addr", "add", "10.89.20.1/24", "dev", inner],
            ["ip", "-n", ns, "link", "set", "dev", inner, "up"],
        ]
        for cmd in setup:
            subprocess.run(cmd, check=True, capture_output=True)
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "8080", "--bind", "10.89.20.1"],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        yield nic
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", nic], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _flat_desktop(farm: FarmProcess, network: str, nic: str, *vlan: str) -> dict:
    """A running desktop of a new user on a new flat network ``network`` on ``nic``."""
    farm.deckard("network", "create", network, "--range", FLAT_RANGE, "--interface", nic, *vlan)
    farm.deckard("network", "grant", network, "default")
    farm.deckard("user", "add", f"{network}u", "--password", PASSWORD, "--tenant", "default")
    farm.deckard("desktop", "add", f"{network}-desk", "--user", f"{network}u", "--network", network)
    farm.deckard("desktop", "start", f"{network}-desk")
    desk = wait_for(lambda: (d := farm.desktop(f"{network}-desk"))["state"] in ("running", "failed") and d, 60, 0.2)
    assert desk["state"] == "running", f"{desk['failure_reason']}\n{farm.diagnostics()}"  # type: ignore[index]
    return desk  # type: ignore[return-value]


def _check_flat_desktop(farm: FarmProcess, desk: dict, user: str) -> None:
    """Its address and router are the provider's, it reaches the provider network directly (not through the
    node), and the broker still reaches it at its farm address."""
    assert desk["network_ip"] == "10.89.20.11"
    inside = farm.attach(desk["id"], "cat /etc/resolv.conf /proc/net/fib_trie").stdout
    assert "nameserver 10.89.20.1" in inside and "10.89.20.11" in inside
    assert _fetch(farm, desk["id"], "http://10.89.20.1:8080/", PROVIDER_PAGE) == "page"

    async def look() -> int:
        reader, writer = await qvd.connect(farm.broker, user, PASSWORD, farm.ca, desk["id"])
        try:
            width, _height, _pixels = await asyncio.wait_for(grab_framebuffer(reader, writer), 30)
            return width
        finally:
            writer.close()

    assert asyncio.run(look()) > 0
    farm.deckard("desktop", "stop", desk["name"], "--wait", "60")


def test_a_flat_network_puts_a_desktop_on_a_network_of_the_machines_own(farm: FarmProcess) -> None:
    with _provider(None) as nic:
        _check_flat_desktop(farm, _flat_desktop(farm, "office", nic), "officeu")


def test_a_flat_network_on_a_vlan_tags_the_desktops_frames(farm: FarmProcess) -> None:
    reason = _vlan_unsupported()
    if reason:
        pytest.skip(reason)
    with _provider(20) as nic:
        _check_flat_desktop(farm, _flat_desktop(farm, "office20", nic, "--vlan", "20"), "office20u")
