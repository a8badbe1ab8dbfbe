"""The node's side of desktop networking: the packet filter that enforces egress policies, the DNS resolver and
the guests' metadata service (``node/metadata.py``).

At start (before any desktop starts or is adopted) the node loads its whole filter from the database's view
and starts its resolver.  A starting desktop is admitted into the filter with its own policy while its guest
boots (the filter drops everything from an address it does not know, so a desktop is never ahead of its
policy).  Every ``refresh_s`` the node re-reads the policies of its desktops and the farm's protected addresses
and reloads the filter when anything changed: a policy edited with ``deckard config set network.egress``
reaches running desktops within seconds, without a restart.  A resolver that died is started again, and so is a
metadata service that could not bind its address.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import time

import structlog

from deckard.db.engine import Database
from deckard.drivers import firewall, overlay, tenant_net
from deckard.drivers.dns import Resolver
from deckard.drivers.network import flush_neighbours
from deckard.model.egress import Protected, Rule
from deckard.model.entities import utcnow
from deckard.model.errors import DriverError
from deckard.model.network import gateway_of, mac_for_ip
from deckard.model.states import NodeState
from deckard.node.metadata import MetadataServer
from deckard.runtime.settings import Settings
from deckard.services import guest_metadata, network_policy, node_ops
from deckard.services.network_policy import TenantAddress, TenantNetworkRow

log = structlog.get_logger()

# how far back each look for desktops that moved between machines reaches beyond the last one
MOVED_MARGIN_S = 30.0

# an unchanged table is loaded again this often: a ruleset flushed by hand, or a table another node of this
# machine loaded a moment earlier, is made whole again
RELOAD_S = 30.0
MAX_PREPARED = 32  # policies loaded ahead for warm pools (Egress.prepare): the oldest go first
MAX_KEPT = 16  # policies of desktops that stopped here, kept loaded for their next start: the oldest go first


class Egress:
    def __init__(self, db: Database, settings: Settings, *, refresh_s: float = 2.0) -> None:
        self.db = db
        self.bridge = settings.network.bridge
        self.network = settings.network.range
        self.database_url = settings.db_url
        self.refresh_s = refresh_s
        self.resolver = Resolver(
            self.bridge, gateway_of(self.network), settings.paths.node_run_dir, settings.network.dns_servers
        )
        self.farm_id = settings.paths.farm_id
        self.overlay_address = settings.network.overlay_address  # set: the bridge joins the farm's VXLAN segment
        self.overlay_vni = settings.network.overlay_vni
        self._segment: tuple[overlay.Segment, str, tuple[str, ...]] | None = None  # last joined: segment, me, peers
        self._placed: dict[str, int] | None = None  # farm address → node of the desktops seen on other nodes
        self._placed_since: dt.datetime | None = None  # the next look reads changes from then on
        self.metadata: MetadataServer | None = None  # made at start, when the node's id is known
        self._protected: Protected | None = None
        self._desktops: dict[str, tuple[Rule, ...]] = {}
        self._prepared: dict[str, tuple[Rule, ...]] = {}  # chain → rules of policies loaded ahead (:meth:`prepare`)
        self._kept: dict[str, tuple[Rule, ...]] = {}  # chain → rules of policies desktops that left here had
        self.node_name = settings.node.name
        # tenant networks this node has (``drivers/tenant_net.py``): each → what it maps (farm → network address)
        self._tenants: dict[TenantNetworkRow, dict[str, str]] = {}
        self._tenants_at = 0.0  # when they were last applied whole (monotonic)
        self._joined: dict[int, float] = {}  # network id → when a start last joined it (monotonic)
        self._loaded = ""  # the text nft last accepted
        self._loaded_at = 0.0  # when (monotonic): the table is loaded again now and then even if unchanged
        self._lock = asyncio.Lock()

    async def start(self, node_id: int) -> None:
        await firewall.remove_legacy_guard(self.bridge)
        await firewall.enable_forwarding()
        await self.join_overlay(node_id)
        await self.refresh(node_id)
        await self.prepare(await network_policy.farm_policy(self.db))  # most desktops' policy, before any asks
        await self.refresh_tenants(node_id)
        await self.resolver.start()
        lookup = functools.partial(
            guest_metadata.metadata_for_ip, self.db, node_id, network=self.network, farm_id=self.farm_id
        )
        self.metadata = MetadataServer(lookup, gateway_of(self.network))
        await self.metadata.start()

    async def close(self) -> None:
        """The filter stays (desktops that outlive the daemon keep their policy); the resolver and the metadata
        service stop."""
        if self.metadata is not None:
            await self.metadata.stop()
        await self.resolver.stop()

    async def refresh(self, node_id: int) -> None:
        protected, desktops = await network_policy.node_view(self.db, node_id, self.network, self.database_url)
        async with self._lock:
            self._protected = protected
            for ip, rules in self._desktops.items():
                if ip not in desktops:  # its address leaves the table, its policy's chain stays for a while
                    _remember(self._kept, rules, MAX_KEPT)
            self._desktops = desktops
            await self._load()

    async def join_overlay(self, node_id: int) -> None:
        """With ``network.overlay_address``: put the bridge on the farm's VXLAN segment, flooding to every other
        live node's underlay address (again whenever the farm's nodes change)."""
        if not self.overlay_address:
            return
        nodes = await node_ops.farm_nodes(self.db)
        segment = overlay.Segment(
            self.bridge,
            self.network,
            self.overlay_vni,
            self.overlay_address,
            tuple(overlay.node_addresses(self.network, (i for i, _, _ in nodes))),
        )
        # nodes whose desktops may be running (one restarting in place keeps them); those registered without an
        # overlay address have the gateway as their address
        live = {NodeState.STARTING, NodeState.RUNNING, NodeState.RESTARTING, NodeState.STOPPING}
        peers = tuple(
            sorted(
                addr
                for i, addr, state in nodes
                if i != node_id and state in live and addr not in ("", self.overlay_address, gateway_of(self.network))
            )
        )
        me = overlay.node_address(self.network, node_id)
        await self._forget_moved(node_id)
        if self._segment == (segment, me, peers):
            return
        if self._segment is not None and self._segment[:2] == (segment, me):
            await overlay.set_peers(overlay.vxlan_name(self.bridge), peers)
        else:
            await overlay.join(segment, me, peers)
        self._segment = (segment, me, peers)

    async def _forget_moved(self, node_id: int) -> None:
        """A desktop that now runs on another machine than when this node last reached it: forget its neighbour
        entry, so the next packet asks the segment again (ARP floods to every machine) instead of going to the
        machine it left, which may be powered off."""
        now = utcnow()
        # after the first look, only the desktops whose state changed since the last (with a margin for the
        # nodes' clocks and for transactions that committed late): a farm of thousands is not read every 2 s
        where = await node_ops.desktops_elsewhere(self.db, node_id, self._placed_since)
        if self._placed is not None:  # the first look only learns where they are
            moved = sorted(ip for ip, node in where.items() if self._placed.get(ip) != node)
            if moved:  # the MACs too: a frame that still goes out floods to every peer, not to the machine left
                await flush_neighbours(moved)
                await overlay.forget_macs(overlay.vxlan_name(self.bridge), [mac_for_ip(ip) for ip in moved])
                log.info("network.overlay_desktops_moved", addresses=moved[:20], count=len(moved))
            where = {**self._placed, **where}  # remembered while released too: it may start anywhere next
        self._placed, self._placed_since = where, now - dt.timedelta(seconds=MOVED_MARGIN_S)

    def _tenant(self, row: TenantNetworkRow, node_id: int) -> tuple[tenant_net.TenantNetwork, tenant_net.Names]:
        flat = None
        if row.interface is not None:
            own = overlay.node_address(row.range, node_id)
            flat = tenant_net.Flat(row.interface, row.vlan, row.gateway, own)
        net = tenant_net.TenantNetwork(row.network_id, row.range, self.bridge, self.network, flat)
        return net, tenant_net.names(self.bridge, self.node_name, row.network_id)

    async def join_tenant(self, tenant: TenantAddress, farm_ip: str, node_id: int) -> str:
        """A desktop on a tenant network starts here: its network's bridge, namespace and the desktop's mapping
        are made now (the next refresh keeps them); returns the bridge its guest plugs into."""
        row = tenant.network
        net, names = self._tenant(row, node_id)
        async with self._lock:
            self._joined[row.network_id] = time.monotonic()
            mapping = {**self._tenants.get(row, {}), farm_ip: tenant.address}
            await tenant_net.ensure(net, names)
            await tenant_net.apply(net, names, mapping)
            self._tenants[row] = mapping
        return names.bridge

    async def refresh_tenants(self, node_id: int) -> None:
        """Every tenant network with a desktop on this node exists with exactly their mappings; one without any
        is taken down (not one a start joined a moment ago: its desktop may not be in the view yet)."""
        async with self._lock:  # read under the lock: a start that joined before is in the view
            view = await network_policy.tenant_view(self.db, node_id)
            whole = time.monotonic() - self._tenants_at > RELOAD_S
            for row, mapping in view.items():
                if whole or self._tenants.get(row) != mapping:
                    net, names = self._tenant(row, node_id)
                    await tenant_net.ensure(net, names)
                    await tenant_net.apply(net, names, mapping)
            now = time.monotonic()
            recent = {i for i, at in self._joined.items() if now - at < RELOAD_S}
            wanted = {row.network_id for row in view} | recent
            have = tenant_net.existing(self.bridge, self.node_name) | {row.network_id for row in self._tenants}
            for network_id in have - wanted:
                await tenant_net.remove(tenant_net.names(self.bridge, self.node_name, network_id))
                self._joined.pop(network_id, None)
            self._tenants = {r: m for r, m in self._tenants.items() if r.network_id in recent} | view
            if whole:
                self._tenants_at = now

    async def admit(self, ip: str, rules: tuple[Rule, ...]) -> None:
        """A desktop starts: its address gets its policy (a stopped one leaves at the next refresh).  When the
        policy's chain is loaded already (another desktop has it, :meth:`prepare`, or a desktop that stopped here
        had it: a restart, most often), only the address is added (~0.2 ms; loading the whole table took 15-20 ms
        of a CPU beside the guest's boot)."""
        async with self._lock:
            chain = firewall.policy_chain(rules)
            # its chain is in the table
            loaded = chain in self._prepared or chain in self._kept or rules in self._desktops.values()
            quick = loaded and ip not in self._desktops and bool(self._loaded)
            self._desktops[ip] = rules
            if quick:
                try:
                    await firewall.add_desktop(self.bridge, ip, chain)
                    self._loaded = self._table().render()  # what the kernel has now: the next refresh keeps it
                    return
                except DriverError as e:
                    log.info("network.quick_admit_failed", ip=ip, error=e.message)
            await self._load()

    async def prepare(self, rules: tuple[Rule, ...]) -> None:
        """Load a policy's chain before any desktop has it (a warm pool's, at its guests' start), so the take-over
        that gives it a desktop only adds an address (:meth:`admit`).  Up to :data:`MAX_PREPARED` are kept."""
        async with self._lock:
            chain = firewall.policy_chain(rules)
            if chain in self._prepared:
                return
            _remember(self._prepared, rules, MAX_PREPARED)
            await self._load()

    def _table(self) -> firewall.Table:
        assert self._protected is not None, "refresh() first"
        return firewall.Table(
            self.bridge,
            self._protected,
            dict(self._desktops),
            overlay=bool(self.overlay_address),
            prepared=(*self._prepared.values(), *self._kept.values()),
        )

    async def _load(self) -> None:
        assert self._protected is not None, "refresh() first"
        text = self._table().render()
        if text == self._loaded and time.monotonic() - self._loaded_at < RELOAD_S:
            return
        await firewall.load(self.bridge, text)
        self._loaded, self._loaded_at = text, time.monotonic()
        log.debug("network.filter_loaded", desktops=len(self._desktops))

    async def run(self, node_id: int, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.refresh_s)
            if stop.is_set():
                return
            try:
                await self.join_overlay(node_id)
                await self.refresh(node_id)
                await self.refresh_tenants(node_id)
                await self.resolver.ensure()
                if self.metadata is not None:
                    await self.metadata.ensure()
            except Exception as e:  # the database away, nft refusing: the filter in place stays, try again
                log.warning("network.refresh_failed", error=str(e))


def _remember(chains: dict[str, tuple[Rule, ...]], rules: tuple[Rule, ...], most: int) -> None:
    """``rules``' chain as the newest of ``chains``, which keeps the ``most`` newest."""
    chain = firewall.policy_chain(rules)
    chains.pop(chain, None)
    chains[chain] = rules
    while len(chains) > most:
        del chains[next(iter(chains))]
