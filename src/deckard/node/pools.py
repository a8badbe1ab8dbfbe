"""The node's part of the warm pools (``services/pools.py``, ``docs/pools.md``): keep this node's share of warm
guests started, and stop those the pools no longer want.

Every pass (a pool changed or a guest was taken: the ``pools`` channel; else every ``PASS_S``) reads the plan:
guests to trim (a pool with too many, or an image replaced under its tag) are stopped once their row is gone, a
guest whose container died loses its row, and a pool short of guests gets one more if placement picks this node
(one start per pool at a time; a pool whose guest failed waits ``RETRY_S``, its error shown on the pool).  A warm
guest counts as ready when its agent answers with its display up.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable

import structlog

from deckard.client import rfb
from deckard.client.agent import AgentClient
from deckard.db.engine import Database
from deckard.drivers.base import DISPLAY_PORT, Driver, GuestSpec
from deckard.drivers.display import display_password
from deckard.model.errors import DeckardError, reason_of
from deckard.model.network import gateway_of, prefix_len
from deckard.model.warm_pool import WARM_GUEST_MARK, new_warm_guest_name
from deckard.node.egress import Egress
from deckard.runtime.paths import FarmPaths
from deckard.services import network_policy, node_ops, pools
from deckard.services.config import GuestSwitches
from deckard.services.desktops import new_agent_token

log = structlog.get_logger()

PASS_S = 2.0
RETRY_S = 30.0  # after a warm guest of a pool failed to start
READY_TIMEOUT_S = 60.0
FIRST_VIEWER_TIMEOUT_S = 5.0


class WarmPools:
    def __init__(
        self,
        db: Database,
        driver: Driver,
        paths: FarmPaths,
        node_id: int,
        *,
        network: str,
        bridge: str,
        may_start: Callable[[], bool],
        slots: asyncio.Semaphore,
        egress: Egress | None = None,
    ) -> None:
        self.db, self.driver, self.paths, self.node_id = db, driver, paths, node_id
        self.network, self.bridge = network, bridge
        self.may_start = may_start  # False while the node is fenced
        self.slots = slots  # the node's start slots: a user's start never waits behind many warm ones
        self.egress = egress  # loads the pool's policy ahead: the take-over then only adds an address
        self._starting: dict[int, asyncio.Task[None]] = {}  # pool id → the start of its next guest
        self._failed_at: dict[int, float] = {}
        # guest name → the switches it was started with; a node restart drops every guest
        self._started_as: dict[str, GuestSwitches] = {}
        self._had_guests = True  # the first pass looks for guests a previous daemon left

    async def run(self, stop: asyncio.Event) -> None:
        try:
            async with self.db.bus.subscribe(pools.POOLS) as sub:
                while not stop.is_set():
                    try:
                        await self.reconcile()
                    except Exception as e:  # the database away: try again at the next pass
                        log.warning("pools.reconcile_failed", error=str(e))
                    await sub.wait(PASS_S)
        finally:
            for task in self._starting.values():
                task.cancel()
            await asyncio.gather(*self._starting.values(), return_exceptions=True)

    async def reconcile(self) -> None:
        plans, own = await pools.node_plan(self.db, self.node_id)
        if not plans and not own and not self._had_guests:
            return  # a farm without pools pays one query a pass
        self._had_guests = bool(plans or own)  # after the last pool goes: one more pass stops what it left
        running = {g.guest_name for g in await self.driver.list() if g.running}
        trim = {name for plan, _spec in plans for name in plan.trim}
        # the farm's administrator changed nx.shares.in_containers or display.glx: guests started the other way go
        by_pool = {plan.pool_id: spec for plan, spec in plans}
        names = {g.name for g in own}
        self._started_as = {name: how for name, how in self._started_as.items() if name in names}
        for g in own:
            spec = by_pool.get(g.pool_id)
            if spec is not None and self._started_as.get(g.name, spec.switches) != spec.switches:
                trim.add(g.name)
        dead = [g.name for g in own if g.name not in running and g.pool_id not in self._starting]
        if dead:
            log.info("pools.guests_gone", guests=dead)
            await pools.drop_warm_guests(self.db, dead)
        # a guest whose row went (its pool was deleted) and that no desktop took over: nobody's any more
        taken = {d.guest for d in await node_ops.desktops_on_node(self.db, self.node_id) if d.guest}
        mark = self.paths.guest_prefix() + WARM_GUEST_MARK
        rows = {g.name for g in own}
        for name in {n for n in running if n.startswith(mark)} - rows - taken:
            log.info("pools.guest_orphaned", guest=name)
            trim.add(name)
        for name in trim:
            if await pools.drop_warm_guests(self.db, [name]) or name not in rows:  # out of the pool first
                log.info("pools.guest_trimmed", guest=name)
                with contextlib.suppress(Exception):
                    await self.driver.kill(name)
        if not self.may_start():
            return
        now = time.monotonic()
        for plan, spec in plans:
            if spec is None or plan.live >= plan.wanted or plan.pool_id in self._starting:
                continue
            if now - self._failed_at.get(plan.pool_id, -RETRY_S) < RETRY_S:
                continue
            name = new_warm_guest_name(self.paths.guest_prefix())
            guest = await pools.add_warm_guest(self.db, spec, self.node_id, name, new_agent_token(), self.network)
            if guest is None:
                continue  # placement picked another node: it starts the guest
            self._starting[plan.pool_id] = asyncio.create_task(self._start(guest, spec), name=f"warm-{guest.name}")

    async def _start(self, guest: pools.WarmGuest, spec: pools.PoolSpec) -> None:
        try:
            await self._boot(guest, spec)
        finally:
            self._starting.pop(spec.pool_id, None)

    async def _boot(self, guest: pools.WarmGuest, spec: pools.PoolSpec) -> None:
        t0 = time.monotonic()
        try:
            if self.egress is not None:
                await self.egress.prepare(await network_policy.osf_policy(self.db, spec.osf_id))
            async with self.slots:
                await self.driver.start(
                    GuestSpec(
                        desktop_id=0,
                        guest_name=guest.name,
                        image_id=spec.image_id,
                        image_path=spec.image_path,
                        ip=guest.ip,
                        prefix_len=prefix_len(self.network),
                        gateway=gateway_of(self.network),
                        # not derived from its address: that address goes to the next warm guest once this one
                        # is taken over (and readdressed), and two ports with one MAC make the bridge flap
                        mac="54:52:01:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3)),
                        bridge=self.bridge,
                        memory_mib=spec.memory_mib,
                        cpus=spec.cpus,
                        user_login="",
                        user_uid=0,
                        home_dir=self.paths.node_run_dir / "warm" / guest.name,
                        agent_token=guest.agent_token,
                        warm=True,
                        mounter=spec.mounter,
                        glx=spec.glx,
                    )
                )
                self._started_as[guest.name] = spec.switches
                await self._wait_warm(guest)
            await first_viewer(guest.ip, guest.agent_token)  # after the start slot: a user's start may want it
            if await pools.warm_ready(self.db, guest.id):
                await pools.pool_healthy(self.db, spec.pool_id)
                log.info(
                    "pools.guest_ready",
                    pool_id=spec.pool_id,
                    guest=guest.name,
                    ms=round((time.monotonic() - t0) * 1000),
                )
            else:  # its pool went while it started
                await self.driver.kill(guest.name)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.driver.kill(guest.name)
            raise
        except Exception as e:
            reason = reason_of(e)
            log.warning("pools.guest_failed", pool_id=spec.pool_id, guest=guest.name, reason=reason)
            self._failed_at[spec.pool_id] = time.monotonic()
            with contextlib.suppress(Exception):
                await self.driver.kill(guest.name)
            await pools.drop_warm_guests(self.db, [guest.name])
            await pools.pool_failed(self.db, spec.pool_id, reason)

    async def _wait_warm(self, guest: pools.WarmGuest) -> None:
        """Until the guest's agent answers with its display up (``warm``)."""
        agent = AgentClient(guest.ip, guest.agent_token, timeout=1.0)
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                state = (await agent.ping()).get("x_state")
                if state == "warm":
                    return
                last = f"its display is {state}"
            except DeckardError as e:
                last = e.message
            info = await self.driver.inspect(guest.name)
            if info is None or not info.running:
                raise DeckardError("the warm guest exited during start", code="guest_exited")
            await asyncio.sleep(0.05)
        raise DeckardError(
            f"the warm guest was not ready within {READY_TIMEOUT_S:.0f} s ({last})", code="agent_timeout"
        )


async def first_viewer(ip: str, agent_token: str, port: int = DISPLAY_PORT) -> bool:
    """Be a warm guest's first viewer, before any user: Xvnc lets its first viewer in only once it has copied its
    whole framebuffer (the base its change tracking compares with; 3-8 ms here, once per Xvnc), which the user who
    takes the guest over would otherwise wait for.  False (logged) when that failed: the user then pays the copy."""
    try:
        async with asyncio.timeout(FIRST_VIEWER_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(ip, port)
            try:
                await rfb.handshake(reader, writer, password=display_password(agent_token))
            finally:
                writer.close()
    except (OSError, TimeoutError, rfb.RFBError, asyncio.IncompleteReadError) as e:
        log.info("pools.first_viewer_failed", ip=ip, error=str(e) or type(e).__name__)
        return False
    return True
