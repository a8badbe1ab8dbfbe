"""Fencing across machines (issue 15, QVD's Luna): a lost node is powered off through *its own* fence agent, run by
another node, before its desktops are released.

Each "machine" is a real ``deckard node --driver fake`` process group with a simulated BMC beside it: OpenIPMI's
``ipmi_sim`` on a loopback UDP port whose chassis power-off SIGKILLs that group (tests/ipmi_bmc.py).  The machine
is hung with SIGSTOP (it stops heart-beating but nothing dies by itself); the surviving node's cluster monitor
declares it lost, runs ``fence_ipmilan`` with the options the machine registered at start (its password from a
file, on the agent's stdin), checks ``action=status`` says off, and only then releases the desktops.  A BMC that
refuses leaves them assigned, and the node listing says why.  PostgreSQL only: a farm across machines needs a
networked database, and the node processes and the test share it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import test_api
from test_api import Farm, add_node, call

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Conflict
from deckard.model.fence import MASK, FenceConfig
from deckard.node.fencing import AgentFencing, load_fencing
from deckard.runtime.bmc import bmc_missing_reason
from deckard.runtime.paths import FarmPaths
from deckard.services import cluster, nodes
from deckard.services.cluster import FenceFailed, LostNode
from deckard.services.context import SYSTEM
from deckard.services.desktops import create_desktop, request_start
from deckard.services.images import register_image
from deckard.services.tenancy import bootstrap_farm
from deckard.services.users import create_user
from deckard.testing import InProcessNode, MultiNodeFarm
from ipmi_bmc import PASSWORD, Bmc

DATABASES = ["postgresql"]
LEASE = {"heartbeat_s": 0.5, "self_fence_after_s": 3.0, "lost_after_s": 4.0}  # margins for a busy machine
d = t.desktops

farm = test_api.farm  # the real API with TLS, for the fence routes


async def wait_for(what: str, check: Callable[[], Awaitable[Any]], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)
    return value


async def desktop_rows(db: Database, ids: list[int]) -> list[Any]:
    async with db.connect() as conn:
        return list(await conn.execute(sa.select(d).where(d.c.id.in_(ids)).order_by(d.c.id)))


async def node_row(db: Database, name: str) -> dict[str, Any]:
    rows, _ = await nodes.list_nodes(db, SYSTEM)
    return next(r for r in rows if r["name"] == name)


@dataclass
class Machine:
    """A node process and its BMC; ``desktops`` run on it."""

    name: str
    bmc: Bmc
    proc: Any
    node_id: int
    desktops: list[int]

    def hang(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)  # silent, not dead: only a fence makes it safe


@dataclass
class Machines:
    """Machines 2 and 3 (node processes with their BMCs; 3's fence agent has the wrong password) running
    desktops, and machine 1 (in process) that judges them."""

    db: Database
    m2: Machine
    m3: Machine
    judge: InProcessNode
    procs: MultiNodeFarm


async def start_machine(
    db: Database, procs: MultiNodeFarm, bmc: Bmc, name: str, password: str, tmp_path: Path, *, flags: bool
) -> tuple[Any, int]:
    password_file = tmp_path / f"{name}-bmc-password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    env = {f"DECKARD_NODE__{k.upper()}": str(v) for k, v in LEASE.items() if k != "lost_after_s"}
    args: list[str] = []
    if flags:  # `deckard node --fence-agent … --fence-option … --fence-password-file …`
        args += ["--fence-agent", "fence_ipmilan", "--fence-password-file", str(password_file)]
        for key, value in bmc.options().items():
            args += ["--fence-option", f"{key}={value}"]
    else:  # the same from its settings (deckard.toml or, here, the environment)
        env |= {
            "DECKARD_NODE__FENCE_AGENT": "fence_ipmilan",
            "DECKARD_NODE__FENCE_OPTIONS": json.dumps(bmc.options()),
            "DECKARD_NODE__FENCE_PASSWORD_FILE": str(password_file),
        }
    node = procs.start_node(name, extra_env=env, extra_args=args)
    bmc.machine(node.proc.pid)  # its own process group (start_new_session): the machine's power
    return node.proc, await wait_for(f"{name}'s node running", lambda: running_node(db, name), 30)


@pytest.fixture
async def machines(db: Database, tmp_path: Path) -> AsyncIterator[Machines]:
    reason = bmc_missing_reason()
    if reason:
        pytest.skip(reason)
    await bootstrap_farm(db)
    async with db.begin() as conn:  # placement's freshness as the nodes' monitors judge it (else 10 s: a machine
        # hung 4-10 s ago, not yet declared lost while the other one is fenced, could be chosen for a desktop)
        value = str(LEASE["lost_after_s"])
        await conn.execute(
            sa.insert(t.config).values(tenant_id=0, key="node.lost_after_s", value=value, updated_at=utcnow())
        )
    await create_user(db, SYSTEM, "alice", "pw-alice")
    network = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24"
    ids = [int((await create_desktop(db, SYSTEM, f"desk{i}", "alice", network=network))["id"]) for i in (1, 2, 3)]
    (tmp_path / "image.tar").write_bytes(b"")
    await register_image(db, tmp_path / "image.tar", version="test")
    procs = MultiNodeFarm(db.url, lost_after=LEASE["lost_after_s"])
    judge = InProcessNode.fake(db, network, name="m1", monitor_s=0.3, **LEASE)
    with Bmc(tmp_path, "m2") as bmc2, Bmc(tmp_path, "m3") as bmc3:
        try:
            (proc2, id2), (proc3, id3), id1 = await asyncio.gather(
                start_machine(db, procs, bmc2, "m2", PASSWORD, tmp_path, flags=False),
                start_machine(db, procs, bmc3, "m3", "not-the-password", tmp_path, flags=True),
                judge.start(),
            )
            placed = {id2: ids[:2], id3: ids[2:]}
            for node_id, desks in placed.items():  # each machine's desktops where the test wants them
                for other in {id1, id2, id3} - {node_id}:
                    await nodes.set_node_blocked(db, SYSTEM, other, True)
                await nodes.set_node_blocked(db, SYSTEM, node_id, False)
                for desktop_id in desks:
                    assert await request_start(db, desktop_id) == node_id
            await wait_for("desktops running", lambda: all_in(db, ids, "running"), 15)
            await nodes.set_node_blocked(db, SYSTEM, id1, False)
            yield Machines(
                db,
                Machine("m2", bmc2, proc2, id2, placed[id2]),
                Machine("m3", bmc3, proc3, id3, placed[id3]),
                judge,
                procs,
            )
        finally:
            await judge.close()
            for name, node in procs.nodes.items():
                if node.proc.poll() is None:
                    procs.kill(name)  # SIGKILL: a stopped process would ignore close()'s SIGTERM
            procs.close()


async def running_node(db: Database, name: str) -> int | None:
    async with db.connect() as conn:
        row = (await conn.execute(sa.select(t.nodes.c.id, t.nodes.c.state).where(t.nodes.c.name == name))).first()
    return int(row.id) if row is not None and row.state == "running" else None


async def all_in(db: Database, ids: list[int], state: str) -> bool:
    return all(r.state == state for r in await desktop_rows(db, ids))


async def test_hung_machines_are_fenced_through_their_bmcs_before_their_desktops_move_and_a_refusal_keeps_them(
    machines: Machines,
) -> None:
    """Machine 2's BMC powers it off and its desktops start on machine 1; machine 3's BMC refuses the password,
    so its desktops stay assigned (unavailable, never twice) and the node listing says why."""
    db, m2, m3 = machines.db, machines.m2, machines.m3
    row = await node_row(db, "m2")
    assert row["fence_agent"] == "fence_ipmilan"  # registered by the node at start (settings + password file)
    assert row["fence_options"]["password"] == MASK and PASSWORD not in json.dumps(row, default=str)
    m2.hang()
    m3.hang()
    t0 = time.monotonic()

    async def released() -> bool:
        return all(r.node_id is None and r.state == "stopped" for r in await desktop_rows(db, m2.desktops))

    async def fence_failed() -> dict[str, Any] | None:
        row = await node_row(db, "m3")
        return row if (row["lost_reason"] or "").startswith("fencing failed") else None

    await wait_for("machine 2's desktops released", released, 20)
    took = time.monotonic() - t0
    assert m2.proc.wait(5) == -signal.SIGKILL  # the BMC cut the power: the node's process group died
    calls = m2.bmc.power_calls()
    after_off = calls[calls.index("set power 0") + 1 :]
    assert after_off.count("get power") >= 2, calls  # fence_ipmilan's off waits for off; then our action=status
    row = await node_row(db, "m2")
    assert row["state"] == "lost" and row["lost_reason"] == "fenced; 2 desktop(s) released"
    judge_id = machines.judge.daemon.node_id if machines.judge.daemon else None
    for desktop_id in m2.desktops:  # their users connect again: they start on machine 1
        assert await request_start(db, desktop_id) == judge_id
    await wait_for("desktops running on machine 1", lambda: all_in(db, m2.desktops, "running"), 10)
    assert {r.node_id for r in await desktop_rows(db, m2.desktops)} == {judge_id}
    assert took < 15, f"lost → fenced → released took {took:.1f} s"

    row = await wait_for("machine 3's fence failure in the node listing", fence_failed, 10)
    assert row["state"] == "lost" and row["fence_options"]["ipport"] == str(m3.bmc.port)  # from its flags
    assert "fence_ipmilan action=off failed" in row["lost_reason"], row["lost_reason"]
    assert "stay assigned" in row["lost_reason"]
    rows = await desktop_rows(db, m3.desktops)
    assert {(r.node_id, r.state) for r in rows} == {(m3.node_id, "running")}  # unavailable, never twice
    assert m3.proc.poll() is None  # never powered off
    assert "set power 0" not in m3.bmc.power_calls()
    # the operator pulls machine 3's plug and says so: its desktops are released as after a fence
    machines.procs.kill("m3")
    await nodes.confirm_node_off(db, SYSTEM, m3.node_id)
    assert (await node_row(db, "m3"))["lost_reason"].startswith("fenced by hand (confirmed off by ")
    assert all(r.node_id is None and r.state == "stopped" for r in await desktop_rows(db, m3.desktops))


# ---- the fence agent API, with small agents written here -----------------------------------------------
AGENT = """#!{python}
import sys
opts = dict(line.rstrip("\\n").split("=", 1) for line in sys.stdin if "=" in line)
with open({log!r}, "a") as f:
    f.write(repr(sorted(opts.items())) + " argv=" + repr(sys.argv[1:]) + "\\n")
action = opts["action"]
if action == "metadata":
    print('<?xml version="1.0" ?>\\n<resource-agent name="fence_test">\\n<actions>\\n<action name="off"/>')
    print('{status}\\n</actions>\\n</resource-agent>')  # the status action is not on the last line
    sys.exit(0)
if action == "off":
    sys.exit(0 if opts.get("password") == "right" else 1)
if action == "status":
    sys.exit({status_exit})
"""


def agent(tmp_path: Path, *, status: bool = True, status_exit: int = 2) -> tuple[Path, Path]:
    """A fence agent API program in a directory put on PATH: exit codes per action, stdin logged."""
    bin_dir, log = tmp_path / "bin", tmp_path / "agent.log"
    bin_dir.mkdir(exist_ok=True)
    prog = bin_dir / "fence_test"
    prog.write_text(
        AGENT.format(
            python=sys.executable,
            log=str(log),
            status='<action name="status"/>' if status else "",
            status_exit=status_exit,
        )
    )
    prog.chmod(0o755)
    return bin_dir, log


def lost(options: dict[str, str], agent_name: str = "fence_test") -> LostNode:
    return LostNode(7, "m9", "10.0.0.9", 4242, "", "another-boot", "fake", FenceConfig(agent_name, options))


async def test_an_agent_gets_its_options_and_password_on_stdin_only_and_off_is_verified_by_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir, log = agent(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    fence = load_fencing("local", FarmPaths(tmp_path))  # the node's own agent wins over the local default
    assert await fence(lost({"ip": "10.0.0.9", "password": "right"}))
    calls = log.read_text().splitlines()
    assert [c.split("('action', '")[1].split("'")[0] for c in calls] == ["off", "metadata", "status"]
    assert all("argv=[]" in c for c in calls)  # nothing on the command line
    assert "('password', 'right')" in calls[0]


async def test_an_agent_whose_status_stays_on_has_not_fenced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir, _ = agent(tmp_path, status_exit=0)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(FenceFailed, match="does not say off \\(still on\\)"):
        await AgentFencing(verify_s=0.5)(lost({"password": "right"}))


async def test_an_agent_without_status_is_trusted_on_off_and_a_refused_off_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir, log = agent(tmp_path, status=False, status_exit=0)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert await AgentFencing()(lost({"password": "right"}))
    assert "'status'" not in log.read_text()
    with pytest.raises(FenceFailed, match="fence_test action=off failed \\(exit 1\\)"):
        await AgentFencing()(lost({"password": "wrong"}))
    with pytest.raises(FenceFailed, match="fence_nothing is not installed"):
        await AgentFencing()(lost({}, "fence_nothing"))


async def test_a_bmc_that_does_not_answer_fails_the_fence_within_its_timeout() -> None:
    if reason := bmc_missing_reason():
        pytest.skip(reason)
    nobody = {"ip": "127.0.0.1", "ipport": "9", "username": "x", "password": "y", "lanplus": "1"}
    t0 = time.monotonic()
    with pytest.raises(FenceFailed, match="did not answer within 1 s"):
        await AgentFencing(timeout=1.0)(lost(nobody, "fence_ipmilan"))
    assert time.monotonic() - t0 < 3


# ---- configuring it: API and CLI-facing rules ----------------------------------------------------------
async def test_the_api_sets_a_nodes_fence_agent_masks_its_password_and_refuses_bad_options(farm: Farm) -> None:
    api = await farm.admin_client()
    await add_node(farm.db, "m3")
    options = {"ip": "10.0.0.3", "username": "admin", "password": "hunter2", "lanplus": "1"}
    row = await call(api.set_node_fence, "m3", "fence_ipmilan", options)
    assert row.fence_agent == "fence_ipmilan" and row.fence_options == {**options, "password": MASK}
    listed = await call(api.list_nodes)
    assert "hunter2" not in repr(listed) and listed[0].fence_options == row.fence_options
    async with farm.db.connect() as conn:  # the monitors read the real one
        stored = (await conn.execute(sa.select(t.nodes.c.fence_options).where(t.nodes.c.name == "m3"))).scalar_one()
    assert json.loads(stored)["password"] == "hunter2"
    async with farm.db.connect() as conn:  # the audit log keeps the call, its password masked
        audited = [r.arguments for r in await conn.execute(sa.select(t.audit_log.c.arguments))]
    assert any("fence_ipmilan" in a for a in audited) and not any("hunter2" in a for a in audited)
    for agent_name, bad in (("rm -rf", {}), ("fence_ipmilan", {"action": "on"}), ("fence_x", {"ip": "a\nb"})):
        with pytest.raises(BadInput) as e:
            await call(api.set_node_fence, "m3", agent_name, bad)
        assert e.value.code in ("bad_fence_agent", "bad_fence_option")
    cleared = await call(api.clear_node_fence, "m3")
    assert cleared.fence_agent == "" and cleared.fence_options is None
    with pytest.raises(Conflict) as refused:  # a live node's desktops are never released by hand
        await call(api.confirm_node_off, "m3")
    assert refused.value.code == "node_not_lost"
    async with farm.db.begin() as conn:
        await conn.execute(sa.update(t.nodes).where(t.nodes.c.name == "m3").values(state="lost"))
    confirmed = await call(api.confirm_node_off, "m3")
    assert confirmed.lost_reason == "fenced by hand (confirmed off by admin); 0 desktop(s) released"


async def test_a_crashing_agent_is_a_failed_fence_with_its_reason_retried_by_one_monitor_per_interval(
    db: Database,
) -> None:
    node_id = await add_node(db, "m4")
    async with db.begin() as conn:
        old = utcnow() - dt.timedelta(hours=1)
        await conn.execute(sa.update(t.nodes).where(t.nodes.c.id == node_id).values(heartbeat_at=old))
    await bootstrap_farm(db)
    await create_user(db, SYSTEM, "bob", "pw-bob")
    desk = await create_desktop(db, SYSTEM, "held", "bob", network="127.77.0.0/24")
    async with db.begin() as conn:
        await conn.execute(sa.update(d).where(d.c.id == desk["id"]).values(node_id=node_id, state="running"))
    calls: list[str] = []

    async def crash(node: LostNode) -> bool:
        calls.append(node.name)
        raise OSError(f"BMC of {node.name} unreachable")

    assert await cluster.handle_lost_nodes(db, 10_000, 3.0, crash, retry_s=0.5) == {}
    row = await node_row(db, "m4")
    assert row["lost_reason"].startswith("fencing failed (OSError: BMC of m4 unreachable)")
    assert (await desktop_rows(db, [desk["id"]]))[0].node_id == node_id  # still assigned
    # every node's monitor passes again at once: within the interval nobody retries, after it exactly one does
    monitors = [cluster.handle_lost_nodes(db, 10_000 + i, 3.0, crash, retry_s=0.5) for i in range(3)]
    await asyncio.gather(*monitors)
    assert calls == ["m4"]
    await asyncio.sleep(0.6)
    await asyncio.gather(*(cluster.handle_lost_nodes(db, 10_000 + i, 3.0, crash, retry_s=0.5) for i in range(3)))
    assert calls == ["m4", "m4"]
