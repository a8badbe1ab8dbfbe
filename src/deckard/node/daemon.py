"""The node daemon (QVD's HKD): register, heartbeat, claim commands, run desktops, watch their agents.

It is a level-based reconciler (controller-runtime's contract): every pass re-reads what the database wants
for this node and acts until the guests match, so a pass is safe to repeat after a crash.  It wakes on
notifications for its own channel; with SQLite (no cross-process notifications) a short poll stands in.

Convergence after ``kill -9``: guests live on without the daemon (LXC daemonises them).  At start the daemon
adopts the guests whose desktop is ``running`` here and whose agent answers, and kills every other guest of
this farm, so no container, overlay, veth or cgroup is left behind and no desktop stays ``starting``.

Farm safety (docs/farm.md): the heartbeat is written by its own thread on its own connection
(node/heartbeat.py); a node whose lease lapsed while another node could take its desktops over kills its own
guests (self-fencing, decided by node/fencing.py: never on a one-node farm, never while the database says the
lease holds), and a node whose row the database shows ``lost`` kills its guests and registers again — it never
resurrects a desktop that moved.  Every node also runs the cluster monitor (node/cluster.py) that fences and
releases silent nodes.

Restart in place (``cmd='restart'`` or SIGHUP): the daemon finishes the starts and stops in flight, leaves its
guests running, marks the node ``restarting`` and sets ``restart``; the process then re-executes itself
(cli/farm.py) and the new daemon adopts the guests like after a crash, without stopping any desktop.  The
daemon closes its driver last, whether it stops or restarts: that is when the fake driver, whose guests live
in this process, hands them over to the next one (drivers/fake.py); the daemon itself knows no driver apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass

import structlog

from deckard.client.agent import AgentClient
from deckard.db.engine import Database
from deckard.drivers.base import Driver, GuestSpec, WarmDriver
from deckard.drivers.display import load_des
from deckard.model.entities import Desktop, uid_for_user
from deckard.model.errors import DeckardError, reason_of
from deckard.model.guest_metadata import nocloud_files
from deckard.model.network import gateway_of, prefix_len
from deckard.model.states import DesktopCommand, DesktopState, NodeCommand, NodeState
from deckard.node.activity import run_activity_loop
from deckard.node.cluster import ClusterMonitor
from deckard.node.egress import Egress
from deckard.node.expiry import run_expiry_loop
from deckard.node.fencing import Verdict, boot_id, load_fencing, own_fence
from deckard.node.heartbeat import Beat, Heartbeat
from deckard.node.host import read_host_figures
from deckard.node.images import run_image_loop
from deckard.node.pools import WarmPools
from deckard.node.session_policy import run_session_policy_loop
from deckard.node.volumes import NodeVolumes
from deckard.runtime.metrics import DESKTOP_START_SECONDS, DESKTOP_STARTS, DESKTOP_STOPS
from deckard.runtime.paths import FarmPaths
from deckard.runtime.settings import Settings
from deckard.services import node_ops, pools
from deckard.services.events import node_channel
from deckard.services.guest_metadata import metadata_for_desktop
from deckard.services.volumes import volume_backend

log = structlog.get_logger()


@dataclass
class _AgentHealth:
    failures: int = 0


PANIC_MARK = "Kernel panic - not syncing"
AGENT_LOOK_S = 0.5  # while waiting for a new guest's agent: how often to check the guest is still running


def console_summary(text: str, lines: int = 3) -> str:
    """The few console lines that explain a failed boot: a kernel panic's own line and the init's and agent's
    last words before it, rather than the register dump that ends a panic; else the last ``lines`` lines."""
    all_lines = [line.strip() for line in text.splitlines() if line.strip()]
    panic = next((i for i in range(len(all_lines) - 1, -1, -1) if PANIC_MARK in all_lines[i]), None)
    if panic is not None:
        before = [line for line in all_lines[:panic] if not line.startswith("[")][-(lines - 1) :]
        picked = [*before, all_lines[panic][all_lines[panic].index(PANIC_MARK) :]]
    else:
        picked = all_lines[-lines:]
    return " | ".join(picked)[-600:]


class NodeDaemon:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        driver: Driver,
        *,
        broker_url: str = "",
        restart: asyncio.Event | None = None,
        egress: Egress | None = None,
    ) -> None:
        self.db = db
        self.egress = egress  # the desktops' packet filter and resolver (None: guests without a network)
        self.restart = restart or asyncio.Event()  # when set, stopping keeps the guests: the process re-executes
        self.settings = settings
        self.cfg = settings.node
        self.paths: FarmPaths = settings.paths
        self.driver = driver
        self.broker_url = broker_url
        self.node_id: int | None = None
        self.network = settings.network.range
        self.gateway = gateway_of(self.network)
        self.bridge = settings.network.bridge
        self._work: dict[int, asyncio.Task[None]] = {}  # desktop id → start/stop in progress
        self._health: dict[int, _AgentHealth] = {}
        self._start_slots = asyncio.Semaphore(self.cfg.max_parallel_starts)
        self.ready = asyncio.Event()
        self.heartbeat: Heartbeat | None = None  # made at registration, once the node has an id
        self._fenced = False  # we killed our guests (self-fencing): reconcile with the database before acting
        self._stop_event: asyncio.Event | None = None
        self.volumes = NodeVolumes(db, driver, self.paths, volume_backend(self.paths))  # hot plug (node/volumes.py)
        self.pools: WarmPools | None = None  # warm pools (node/pools.py), on a node whose driver has warm guests

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def register(self) -> int:
        h = read_host_figures()
        self.node_id = await node_ops.register_node(
            self.db,
            self.cfg.name,
            self.settings.network.overlay_address or self.gateway,  # the underlay address: overlay peers use it
            self.broker_url,
            cpus=h.cpus,
            mem_total_mib=h.mem_total_mib,
            mem_free_mib=h.mem_free_mib,
            load=h.load,
            driver=self.driver.name,
            run_dir=str(self.paths.node_run_dir),
            boot_id=boot_id(),
            fence=own_fence(self.cfg),
        )
        if self.heartbeat is None:
            self.heartbeat = Heartbeat(self.db.url, self.node_id, self.cfg)
        self.heartbeat.renewed()
        return self.node_id

    async def run(self, stop: asyncio.Event) -> None:
        node_id = self.node_id if self.node_id is not None else await self.register()
        structlog.contextvars.bind_contextvars(node=self.cfg.name)
        if isinstance(self.driver, WarmDriver) and self.egress is not None:  # warm guests need the desktop network
            self.pools = WarmPools(
                self.db,
                self.driver,
                self.paths,
                node_id,
                network=self.network,
                bridge=self.bridge,
                may_start=lambda: not self._fenced and not self.restart.is_set(),
                slots=self._start_slots,
                egress=self.egress,
            )
        if self.egress is not None:  # the policies hold before any desktop is adopted or started
            await self.egress.start(node_id)
        await self.converge()
        load_des()  # the first start's display password
        await node_ops.set_node_state(self.db, node_id, NodeState.RUNNING)
        log.info("node.running", node_id=node_id, driver=self.driver.name)
        self.ready.set()
        self._stop_event = stop
        monitor = ClusterMonitor(
            self.db,
            node_id,
            load_fencing(self.cfg.fencing, self.paths, self.cfg.fence_command, self.cfg.fence_timeout_s),
            period_s=self.cfg.monitor_s,
            lost_after_s=self.cfg.lost_after_s,
            retry_s=self.cfg.fence_retry_s,
        )
        loops = [
            asyncio.create_task(monitor.run(stop, self._may_judge), name="cluster-monitor"),
            asyncio.create_task(self._heartbeat_loop(stop), name="heartbeat"),
            asyncio.create_task(self._command_loop(stop), name="commands"),
            asyncio.create_task(self._agent_loop(stop), name="agents"),
            asyncio.create_task(run_expiry_loop(self.db, node_id, stop), name="expiry"),
            asyncio.create_task(run_activity_loop(self.db, node_id, stop), name="activity"),
            asyncio.create_task(run_image_loop(self.db, self.driver, stop), name="images"),
            asyncio.create_task(run_session_policy_loop(self.db, node_id, stop, self.cfg), name="sessions"),
            *([asyncio.create_task(self.egress.run(node_id, stop), name="egress")] if self.egress else []),
            *([asyncio.create_task(self.pools.run(stop), name="pools")] if self.pools else []),
        ]
        try:
            await stop.wait()
        finally:
            await node_ops.set_node_state(self.db, node_id, NodeState.STOPPING)
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self.volumes.close()
            if self.restart.is_set():  # the heartbeat this writes gives the new process lost_after_s to register
                await asyncio.gather(*self._work.values(), return_exceptions=True)
                await node_ops.set_node_state(self.db, node_id, NodeState.RESTARTING)
                log.info("node.restarting", node_id=node_id, kept=len(await self.driver.list()))
            else:
                await self.stop_all()
                await node_ops.set_node_state(self.db, node_id, NodeState.STOPPED)
                log.info("node.stopped", node_id=node_id)
            if self.egress is not None:
                await self.egress.close()
            await self.driver.close()  # the guests still running are the next daemon's

    async def stop_all(self) -> None:
        """Clean node stop (QVD's ``stopping``): every desktop of this node is stopped."""
        assert self.node_id is not None
        for task in list(self._work.values()):
            task.cancel()
        await asyncio.gather(*self._work.values(), return_exceptions=True)
        desks = await node_ops.desktops_on_node(self.db, self.node_id)
        await asyncio.gather(
            *(self._stop(d.id, reason=None) for d in desks if d.state != DesktopState.STOPPED), return_exceptions=True
        )
        for name in await pools.drop_node_guests(self.db, self.node_id):  # the warm guests, out of their pools
            with contextlib.suppress(Exception):
                await self.driver.kill(name)

    # ---- convergence -----------------------------------------------------------------------------------
    async def converge(self) -> None:
        """Make this machine's guests match the database after a restart or a crash."""
        assert self.node_id is not None
        guests = {g.guest_name: g for g in await self.driver.list()}
        keep: set[str] = set()
        await pools.drop_node_guests(self.db, self.node_id)  # warm guests are started afresh, the old ones killed below
        for desk in await node_ops.desktops_on_node(self.db, self.node_id):
            name = self.guest_of(desk)
            guest = guests.get(name)
            if desk.state == DesktopState.RUNNING and guest is not None and guest.running and desk.agent_token:
                try:
                    await AgentClient(desk.ip, desk.agent_token).ping()
                    keep.add(name)
                    log.info("node.adopted", desktop_id=desk.id)
                    continue
                except DeckardError:
                    pass
            if desk.state in (DesktopState.RUNNING, DesktopState.STOPPING, DesktopState.ZOMBIE):
                await self.driver.kill(name)
                await node_ops.mark_stopped(
                    self.db, self.node_id, desk.id, reason="the node restarted and the desktop could not be kept"
                )
            elif desk.state == DesktopState.STARTING:
                await self.driver.kill(name)
                await node_ops.mark_failed(
                    self.db, self.node_id, desk.id, "the node restarted while the desktop was starting: start it again"
                )
        for name in guests.keys() - keep:
            log.info("node.orphan_killed", guest=name)
            await self.driver.kill(name)

    # ---- loops -----------------------------------------------------------------------------------------
    def _may_judge(self) -> bool:
        """Judge other nodes only after our own heartbeats have worked for a whole ``lost_after_s``."""
        hb = self.heartbeat
        return hb is not None and not self._fenced and hb.healthy_for() >= self.cfg.lost_after_s

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        """The heartbeat thread writes (node/heartbeat.py); here we act on its verdicts (node/fencing.py)."""
        assert self.heartbeat is not None

        async def running() -> int:
            return sum(1 for g in await self.driver.list() if g.running)

        async def on_beat(beat: Beat) -> None:
            verdict = beat.decision.verdict
            if verdict is Verdict.LOST:
                await self._declared_lost()
            elif verdict is Verdict.FENCE:
                if not self._fenced:
                    await self._self_fence(beat.decision.reason)
            elif self._fenced and beat.accepted:
                log.warning("node.unfenced", reason="the database is back and this node was not declared lost")
                await self.converge()
                self._fenced = False

        await self.heartbeat.run(stop, running, on_beat)

    async def _kill_all_guests(self) -> None:
        work = list(self._work.values())
        for task in work:
            task.cancel()
        if work:  # their database writes may hang while the database is away: do not wait for them
            await asyncio.wait(work, timeout=2.0)
        for guest in await self.driver.list():
            with contextlib.suppress(Exception):
                await self.driver.kill(guest.guest_name)
        self._health.clear()

    async def _self_fence(self, reason: str) -> None:
        """Our lease ran out and another node may restart our desktops (node/fencing.py): kill ours first."""
        self._fenced = True
        log.error("node.self_fenced", reason=reason)
        await self._kill_all_guests()

    async def _declared_lost(self) -> None:
        """Another node fenced us: our desktops may run elsewhere now.  Kill every guest, register again."""
        log.error("node.declared_lost", reason="the heartbeat found this node's row lost; re-registering")
        self._fenced = True
        await self._kill_all_guests()
        await self.register()
        await self.converge()  # desktops still assigned to us (fencing had failed) are stopped, never resumed
        await node_ops.set_node_state(self.db, self.node_id or 0, NodeState.RUNNING)
        self._fenced = False

    async def _command_loop(self, stop: asyncio.Event) -> None:
        assert self.node_id is not None
        poll = self.cfg.poll_s if not self.db.shared_across_processes else 5.0
        async with self.db.bus.subscribe(node_channel(self.node_id)) as sub:
            while not stop.is_set():
                try:
                    await self.reconcile_once()
                except Exception as e:
                    log.warning("node.reconcile_failed", error=str(e))
                    poll_now = 1.0
                else:
                    poll_now = poll
                await sub.wait(poll_now)

    async def reconcile_once(self) -> None:
        """One pass.  A pass that claimed anything ends with one ``node.reconcile`` line (what it claimed, how
        long it took); idle passes, four a second with SQLite's poll, say nothing.  The starts and stops it
        spawned end with their own ``desktop.running`` / ``desktop.start_failed`` / ``desktop.stopped`` line."""
        assert self.node_id is not None
        if self._fenced:
            return  # no new guest while we may have been declared lost
        t0 = time.monotonic()
        work = await node_ops.pending_work(self.db, self.node_id)
        node_cmd = await node_ops.claim_node_command(self.db, self.node_id) if work.node_command else None
        if node_cmd in (NodeCommand.STOP, NodeCommand.RESTART) and self._stop_event is not None:
            log.info(f"node.{node_cmd}_requested")
            if node_cmd == NodeCommand.RESTART:
                self.restart.set()
            self._stop_event.set()
            return
        if node_cmd == NodeCommand.DRAIN:
            await self._notify_drain()
        stops: list[int] = []
        starts: list[int] = []
        if DesktopCommand.STOP in work.desktop_commands:
            stops = await node_ops.claim_stops(self.db, self.node_id)
            for desktop_id in stops:
                self._spawn(desktop_id, self._stop_claimed(desktop_id))
        if DesktopCommand.START in work.desktop_commands:
            starts = await node_ops.claim_starts(self.db, self.node_id)
            for desktop_id in starts:
                self._spawn(desktop_id, self._start(desktop_id))
        volume_changes = await self.volumes.reconcile(self.node_id, work.volume_changes)
        if node_cmd or stops or starts or volume_changes:
            log.info(
                "node.reconcile",
                command=node_cmd,
                starts=len(starts),
                stops=len(stops),
                volume_changes=volume_changes,
                in_flight=len(self._work),
                ms=round((time.monotonic() - t0) * 1000, 1),
            )

    async def _notify_drain(self) -> None:
        """Drain: tell the users of our running desktops (the agent's ``expire`` hook) that they should leave."""
        assert self.node_id is not None
        desks = [d for d in await node_ops.desktops_on_node(self.db, self.node_id) if d.state == DesktopState.RUNNING]

        async def expire(desk: Desktop) -> None:
            if desk.agent_token:
                with contextlib.suppress(DeckardError):
                    await AgentClient(desk.ip, desk.agent_token, timeout=2.0).expire()

        await asyncio.gather(*(expire(d) for d in desks))
        log.info("node.drain_notified", desktops=len(desks))

    def _spawn(self, desktop_id: int, work: Awaitable[None]) -> None:
        previous = self._work.get(desktop_id)

        async def run() -> None:
            if previous is not None and not previous.done():
                previous.cancel()  # a stop overtakes a start still in progress
                await asyncio.gather(previous, return_exceptions=True)
            await work

        task = asyncio.create_task(run(), name=f"desktop-{desktop_id}")
        self._work[desktop_id] = task
        task.add_done_callback(lambda t: self._work.pop(desktop_id, None) if self._work.get(desktop_id) is t else None)

    # ---- one desktop -----------------------------------------------------------------------------------
    def guest_of(self, desk: Desktop) -> str:
        """The guest a desktop runs in: its own, or the warm guest it took over."""
        return desk.guest or self.paths.guest_name(desk.id)

    async def _start(self, desktop_id: int) -> None:
        assert self.node_id is not None
        name = self.paths.guest_name(desktop_id)
        bound = log.bind(desktop_id=desktop_id)
        t0 = time.monotonic()
        running = False  # once marked running, a stop that overtakes the rest of this start powers the guest off
        warm = False
        try:
            facts = await node_ops.start_facts(self.db, desktop_id)
            if facts.desktop.guest:  # a warm guest (no start slot: nothing boots)
                name = facts.desktop.guest
                warm = await self._take_over(facts)
                if not warm:  # the warm guest is gone or refused: a start of its own instead
                    name = self.paths.guest_name(desktop_id)
                    await node_ops.cold_instead(self.db, self.node_id, desktop_id)
                    facts = await node_ops.start_facts(self.db, desktop_id)
            if warm:
                t1 = t2 = time.monotonic()
            else:
                t1, t2 = await self._cold_start(facts)
            self._health[desktop_id] = _AgentHealth()
            ok = await node_ops.mark_running(
                self.db,
                self.node_id,
                desktop_id,
                image_id=facts.image_id,
                guest_ms=(t1 - t0) * 1000,
                agent_ms=(t2 - t1) * 1000,
            )
            running = True
            bound.info(
                "desktop.running",
                guest_ms=round((t1 - t0) * 1000),
                agent_ms=round((t2 - t1) * 1000),
                kept=ok,
                warm=warm,
            )
            DESKTOP_STARTS.labels(self.cfg.name, "warm" if warm else "ok").inc()
            DESKTOP_START_SECONDS.labels(self.cfg.name).observe(t2 - t0)
            await self._keep_console(name)  # its boot, readable at once
            with contextlib.suppress(Exception):  # volumes attached while it started are hot-plugged now
                await self.volumes.reconcile(self.node_id)
        except asyncio.CancelledError:
            if not running:
                DESKTOP_STARTS.labels(self.cfg.name, "cancelled").inc()
                await self.driver.kill(name)
            raise
        except Exception as e:
            DESKTOP_STARTS.labels(self.cfg.name, "failed").inc()
            reason = reason_of(e)
            bound.warning("desktop.start_failed", reason=reason)
            with contextlib.suppress(Exception):
                await self.driver.kill(name)
            await node_ops.mark_failed(self.db, self.node_id, desktop_id, reason)

    async def _take_over(self, facts: node_ops.StartFacts) -> bool:
        """The desktop takes over the warm guest its start was given (``services/pools.take_warm``): the user's
        home and the desktop's address into it, the desktop's policy loaded, the user's session on its display.
        False (the guest killed) when that fails: the caller starts the desktop the usual way."""
        desk, driver, guest, token = facts.desktop, self.driver, facts.desktop.guest, facts.desktop.agent_token
        assert guest and token and isinstance(driver, WarmDriver)
        try:
            t0 = time.monotonic()
            done: dict[str, float] = {}

            async def guest_then_agent() -> None:
                await driver.take_over(
                    guest,
                    ip=desk.ip,
                    prefix_len=prefix_len(self.network),
                    gateway=self.gateway,
                    home_dir=self.paths.user_home(facts.tenant, facts.home_key),
                    login=facts.user_login,
                    uid=uid_for_user(desk.user_id),
                )
                done["guest_ms"] = round((time.monotonic() - t0) * 1000, 1)
                await AgentClient(desk.ip, token).take_over(facts.user_login, uid_for_user(desk.user_id), desk.ip)
                done["agent_ms"] = round((time.monotonic() - t0) * 1000, 1)

            async def policy() -> None:
                if self.egress is not None:
                    await self.egress.admit(desk.ip, facts.network.rules)
                done["policy_ms"] = round((time.monotonic() - t0) * 1000, 1)

            # side by side: until its policy is in, the filter knows no such address and the session sends nothing
            await asyncio.gather(guest_then_agent(), policy())
            log.info("desktop.taken_over", desktop_id=desk.id, guest=guest, **done)
            return True
        except Exception as e:
            reason = reason_of(e)
            log.warning("desktop.take_over_failed", desktop_id=desk.id, guest=guest, reason=reason)
            with contextlib.suppress(Exception):
                await driver.kill(guest)
            return False

    async def _cold_start(self, facts: node_ops.StartFacts) -> tuple[float, float]:
        """Start the desktop's own guest and wait for its agent: when the guest was launched, and when it answered."""
        assert self.node_id is not None
        desk = facts.desktop
        desktop_id = desk.id
        name = self.paths.guest_name(desktop_id)
        async with self._start_slots:
            if not desk.agent_token:
                raise DeckardError("the desktop has no agent token (claimed twice?)", code="no_token")
            tenant, bridge = facts.tenant_network, self.bridge
            if tenant is not None:  # its network's bridge and namespace first: the guest plugs into them
                if self.egress is None:
                    raise DeckardError(
                        "this node runs no desktop networking (fake driver): it cannot start a desktop on a "
                        "tenant network",
                        code="network_unavailable",
                    )
                bridge = await self.egress.join_tenant(tenant, desk.ip, self.node_id)
            spec = GuestSpec(
                desktop_id=desktop_id,
                guest_name=name,
                image_id=facts.image_id,
                image_path=facts.image_path,
                ip=tenant.address if tenant else desk.ip,
                prefix_len=prefix_len(tenant.network.range if tenant else self.network),
                gateway=tenant.network.gateway if tenant else self.gateway,
                mac=desk.mac,
                bridge=bridge,
                farm_ip=desk.ip if tenant else "",
                memory_mib=facts.memory_mib,
                cpus=facts.cpus,
                user_login=facts.user_login,
                user_uid=uid_for_user(desk.user_id),
                home_dir=self.paths.user_home(facts.tenant, facts.home_key),
                agent_token=desk.agent_token,
                keep_overlay=facts.keep_overlay,
                first_start=desk.start_guest_ms is None,
                mounter=facts.mounter,
                glx=facts.glx,
                dns_search=facts.network.dns_search,
                driver=facts.driver,
                seed=await self._seed(desktop_id) if facts.driver == "vm" else None,
                volumes=await self.volumes.for_start(desktop_id) if facts.volumes else (),
            )
            if self.egress is not None:  # the desktop's policy is loaded while its guest boots: the guest's start
                # first, whose first wait (its layer, on a worker thread) lets the policy's rendering run beside it
                info, _ = await asyncio.gather(self.driver.start(spec), self.egress.admit(desk.ip, facts.network.rules))
            else:
                info = await self.driver.start(spec)
            t1 = time.monotonic()
            # the broker may dial a display shown at boot while we wait for the agent; recorded before ``running``
            shown = asyncio.create_task(self._display_up(desktop_id, facts.image_id)) if info.display_at_boot else None
            try:
                await self._wait_for_agent(desk)
            finally:
                if shown is not None:
                    await shown
            return t1, time.monotonic()

    async def _display_up(self, desktop_id: int, image_id: int) -> None:
        """Record that the guest shows its user's display (``display_at``); if that fails the broker waits for the
        agent, as for any guest."""
        assert self.node_id is not None
        try:
            await node_ops.mark_display_up(self.db, self.node_id, desktop_id, image_id=image_id)
        except Exception as e:
            log.warning("node.display_up_not_recorded", desktop_id=desktop_id, error=str(e))

    async def _seed(self, desktop_id: int) -> dict[str, bytes]:
        """A VM's cloud-init NoCloud seed: what the metadata service serves, on its config disk."""
        md = await metadata_for_desktop(self.db, desktop_id, network=self.network, farm_id=self.paths.farm_id)
        return nocloud_files(md)

    async def _wait_for_agent(self, desk: Desktop) -> None:
        assert desk.agent_token
        agent = AgentClient(desk.ip, desk.agent_token, timeout=1.0)
        deadline = time.monotonic() + self.cfg.start_timeout
        delay = 0.01
        last = "no answer"
        began = looked = time.monotonic()
        while time.monotonic() < deadline:
            try:
                await agent.ping()
                return
            except DeckardError as e:
                last = e.message
            if time.monotonic() - looked >= AGENT_LOOK_S:  # is the guest still there? (a subprocess: not each try)
                looked = time.monotonic()
                guest = await self.driver.inspect(self.paths.guest_name(desk.id))
                if guest is None or not guest.running:
                    raise DeckardError(
                        "the desktop's guest exited during start" + await self._console_tail(desk.id),
                        code="guest_exited",
                    )
            await asyncio.sleep(delay)
            if time.monotonic() - began > AGENT_LOOK_S:  # a container's agent answers within ~0.1 s: try often
                delay = min(delay * 1.3, 0.1)
        raise DeckardError(
            f"the desktop's agent did not answer within {self.cfg.start_timeout:.0f} s ({last})"
            + await self._console_tail(desk.id),
            code="agent_timeout",
        )

    async def _keep_console(self, guest_name: str) -> None:
        """A VM's console ring copied to its log, where ``deckard desktop console-log`` reads it (a container's
        console is a file already: nothing to do)."""
        with contextlib.suppress(Exception):
            await self.driver.console_log(guest_name, 0)

    async def _console_tail(self, desktop_id: int) -> str:
        """What the guest's console says about the failure, for its reason ("" when it said nothing)."""
        with contextlib.suppress(Exception):
            said = console_summary(await self.driver.console_log(self.paths.guest_name(desktop_id), 16384))
            if said:
                return f"; its console said: {said}"
        return ""

    async def _stop_claimed(self, desktop_id: int) -> None:
        await self._stop(desktop_id, reason=None)

    async def _stop(self, desktop_id: int, *, reason: str | None, graceful: bool = True) -> None:
        assert self.node_id is not None
        name = self.paths.guest_name(desktop_id)
        result = "failed"
        try:
            desk = next((d for d in await node_ops.desktops_on_node(self.db, self.node_id) if d.id == desktop_id), None)
            if desk is not None:
                name = self.guest_of(desk)
            if graceful:
                if desk is not None and desk.agent_token:
                    with contextlib.suppress(DeckardError):
                        await AgentClient(desk.ip, desk.agent_token, timeout=1.0).poweroff()
                await self.driver.stop(name, timeout=5.0)
            else:
                await self.driver.kill(name)
            result = "ok" if graceful else "killed"
        finally:
            DESKTOP_STOPS.labels(self.cfg.name, result).inc()
            self._health.pop(desktop_id, None)
            await node_ops.mark_stopped(self.db, self.node_id, desktop_id, reason=reason)
            log.info("desktop.stopped", desktop_id=desktop_id, reason=reason)

    async def _agent_loop(self, stop: asyncio.Event) -> None:
        """Ping the agent of every running desktop; stop those whose guest or agent died."""
        assert self.node_id is not None
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.agent_check_s)
            if stop.is_set():
                return
            try:
                desks = [
                    d
                    for d in await node_ops.desktops_on_node(self.db, self.node_id)
                    if d.state == DesktopState.RUNNING and d.id not in self._work
                ]
                await asyncio.gather(*(self._check_agent(d) for d in desks))
            except Exception as e:
                log.warning("node.agent_check_failed", error=str(e))

    async def _check_agent(self, desk: Desktop) -> None:
        assert self.node_id is not None
        health = self._health.setdefault(desk.id, _AgentHealth())
        guest = await self.driver.inspect(self.guest_of(desk))
        if guest is None or not guest.running:
            self._spawn(desk.id, self._stop(desk.id, reason="the desktop was shut down from inside", graceful=False))
            return
        await self._keep_console(guest.guest_name)
        try:
            assert desk.agent_token
            await AgentClient(desk.ip, desk.agent_token, timeout=2.0).ping()
            health.failures = 0
            await node_ops.agent_ok(self.db, self.node_id, desk.id)
        except DeckardError as e:
            health.failures += 1
            log.warning("desktop.agent_silent", desktop_id=desk.id, failures=health.failures, error=e.message)
            if health.failures >= self.cfg.agent_failures:
                reason = f"the desktop's agent stopped answering ({e.message}); the desktop was stopped"
                await node_ops.mark_zombie(self.db, self.node_id, desk.id, reason)
                self._spawn(desk.id, self._stop(desk.id, reason=reason, graceful=False))
