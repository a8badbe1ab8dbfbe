"""Volumes through the real API (TLS, uvicorn, SQLite and PostgreSQL) with real qcow2 files in the storage root:
every noun (create, resize, snapshot, clone, delete, attach, detach) and every error code the services give
(unknown ids, quotas, a volume in use elsewhere, deleting an attached one, shrinking, snapshotting one a running
desktop writes, tenant isolation), and the node's side of a hot plug played through ``services/node_ops.py``."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import test_api
from test_api import Farm, add_node, call
from test_tenancy_acl import multitenant, tenant_admin

from deckard.client.api import ApiClient
from deckard.db import schema as t
from deckard.model.errors import BadInput, DeckardError
from deckard.model.schemas import Volume
from deckard.services import node_ops

farm = test_api.farm  # the real API with TLS, shared with test_api.py


def _file(farm: Farm, tenant_id: int, volume_id: int) -> Path:
    home = Path(farm.ca).parent.parent  # the farm fixture's Settings(home=tmp_path); tls/ sits in it
    return home / "storage" / "volumes" / str(tenant_id) / f"vol-{volume_id}.qcow2"


def _info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, check=True)
    return dict(json.loads(out.stdout))


def _io(path: Path, command: str) -> bool:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], capture_output=True).returncode == 0


async def _fails(code: str, fn: Any, *args: Any, **kwargs: Any) -> DeckardError:
    with pytest.raises(DeckardError) as e:
        await call(fn, *args, **kwargs)
    assert e.value.code == code, e.value
    return e.value


async def _vm_desktops(api: ApiClient, *names: str) -> None:
    await call(api.create_osf, "vms", driver="vm")
    await call(api.create_user, "vera", "pw-1234")
    for name in names:
        await call(api.create_desktop, name, "vera", osf="vms")


async def _set_desktop(farm: Farm, name: str, **values: Any) -> None:
    async with farm.db.begin() as conn:
        await conn.execute(sa.update(t.desktops).where(t.desktops.c.name == name).values(**values))


async def test_a_volume_is_created_grown_described_and_deleted_with_its_file(farm: Farm) -> None:
    api = await farm.admin_client()
    vol = await call(api.create_volume, "data", 2, description="scratch")
    assert (vol.name, vol.size_gib, vol.state, vol.description, vol.attachments) == ("data", 2, "ready", "scratch", [])
    path = _file(farm, vol.tenant_id, vol.id)
    assert _info(path)["virtual-size"] == 2 << 30
    assert [v.name for v in await call(api.list_volumes)] == ["data"]
    page = await call(api.list_page, "volumes", Volume, {"fields": "size_gib"})
    assert [v.dump() for v in page.items] == [{"id": vol.id, "size_gib": 2}]
    grown = await call(api.update_volume, "data", size_gib=3, description="bigger")
    assert (grown.size_gib, grown.description) == (3, "bigger") and _info(path)["virtual-size"] == 3 << 30
    await _fails("bad_size", api.update_volume, vol.id, size_gib=1)
    assert _info(path)["virtual-size"] == 3 << 30  # a refused shrink changed nothing
    await _fails("duplicate", api.create_volume, "data", 1)
    await call(api.delete_volume, "data")
    assert not path.exists()
    await _fails("volume_not_found", api.get_volume, vol.id)


async def test_unknown_ids_have_their_own_codes(farm: Farm) -> None:
    api = await farm.admin_client()
    await _vm_desktops(api, "d1")
    await _fails("volume_not_found", api.get_volume, 999)
    await _fails("volume_not_found", api.snapshot_volume, "nope", "s1")
    await _fails("volume_not_found", api.attach_volume, "nope", "d1")
    await call(api.create_volume, "data", 1)
    await _fails("desktop_not_found", api.attach_volume, "data", "nosuch")
    await _fails("volume_not_attached", api.detach_volume, "data", "d1")
    await _fails("snapshot_not_found", api.clone_volume, "copy", "data", "nosuch")
    await _fails("snapshot_not_found", api.delete_volume_snapshot, "data", "nosuch")
    await _fails("bad_name", api.create_volume, "-bad", 1)
    assert [v.name for v in await call(api.list_volumes)] == ["data"]  # no clone row was left behind


async def test_quotas_limit_count_and_size_per_tenant_and_leave_nothing_behind(farm: Farm) -> None:
    api = await farm.admin_client()
    await call(api.set_config, "volumes.max_count", 2)
    await call(api.set_config, "volumes.max_gib", 5)
    await call(api.create_volume, "a", 2)
    e = await _fails("volume_quota_exceeded", api.create_volume, "b", 4)
    assert e.details["key"] == "volumes.max_gib"
    b = await call(api.create_volume, "b", 3)
    e = await _fails("volume_quota_exceeded", api.create_volume, "c", 1)
    assert e.details["key"] == "volumes.max_count"
    await _fails("volume_quota_exceeded", api.update_volume, "b", size_gib=4)
    await call(api.snapshot_volume, "b", "s1")
    await _fails("volume_quota_exceeded", api.clone_volume, "c", "b", "s1")
    assert sorted(v.name for v in await call(api.list_volumes)) == ["a", "b"]
    files = sorted(p.name for p in _file(farm, b.tenant_id, b.id).parent.iterdir())
    assert files == sorted(f"vol-{v.id}.qcow2" for v in await call(api.list_volumes))  # no half-made disk


async def test_a_snapshot_keeps_the_content_a_clone_gets(farm: Farm) -> None:
    api = await farm.admin_client()
    vol = await call(api.create_volume, "data", 1)
    path = _file(farm, vol.tenant_id, vol.id)
    assert _io(path, "write -P 0xab 0 64k")
    snap = await call(api.snapshot_volume, "data", "before")
    assert (snap.name, snap.size_gib, snap.volume_id) == ("before", 1, vol.id)
    await _fails("duplicate", api.snapshot_volume, "data", "before")
    assert _io(path, "write -P 0xcd 0 64k")
    await call(api.update_volume, "data", size_gib=2)
    clone = await call(api.clone_volume, "copy", "data", "before")
    assert clone.size_gib == 1  # the snapshot's size, not the volume's now
    copy = _file(farm, clone.tenant_id, clone.id)
    assert _io(copy, "read -P 0xab 0 64k") and _io(path, "read -P 0xcd 0 64k")
    assert [s.name for s in await call(api.list_volume_snapshots, "data")] == ["before"]
    await call(api.delete_volume_snapshot, "data", "before")
    assert await call(api.list_volume_snapshots, "data") == []
    assert "snapshots" not in _info(path)


async def test_one_writer_or_many_readers_and_no_delete_while_attached(farm: Farm) -> None:
    api = await farm.admin_client()
    await _vm_desktops(api, "d1", "d2", "d3")
    await call(api.create_volume, "data", 1)
    vol = await call(api.attach_volume, "data", "d1")
    assert [(x.desktop, x.read_only, x.pending, x.in_guest) for x in vol.attachments] == [("d1", False, None, False)]
    assert (await call(api.attach_volume, "data", "d1")).attachments == vol.attachments  # a repeat changes nothing
    await _fails("volume_attached", api.attach_volume, "data", "d1", read_only=True)
    await _fails("volume_in_use", api.attach_volume, "data", "d2")
    await _fails("volume_in_use", api.attach_volume, "data", "d2", read_only=True)
    await _fails("volume_attached", api.delete_volume, "data")
    await call(api.detach_volume, "data", "d1")
    await call(api.attach_volume, "data", "d1", read_only=True)
    vol = await call(api.attach_volume, "data", "d2", read_only=True)
    assert sorted((x.desktop, x.read_only) for x in vol.attachments) == [("d1", True), ("d2", True)]
    await _fails("volume_in_use", api.attach_volume, "data", "d3")
    # a container desktop reads it too (mounted on /media/data at its start)
    await call(api.create_desktop, "box", "vera")
    vol = await call(api.attach_volume, "data", "box", read_only=True)
    assert sorted(x.desktop for x in vol.attachments) == ["box", "d1", "d2"]


async def test_a_volume_a_running_desktop_writes_is_not_snapshotted_resized_or_cloned(farm: Farm) -> None:
    api = await farm.admin_client()
    await _vm_desktops(api, "d1")
    await call(api.create_volume, "data", 1)
    await call(api.snapshot_volume, "data", "s0")
    await call(api.attach_volume, "data", "d1")
    node_id = await add_node(farm.db)
    await _set_desktop(farm, "d1", state="running", node_id=node_id)
    await _fails("volume_busy", api.snapshot_volume, "data", "s1")
    await _fails("volume_busy", api.update_volume, "data", size_gib=2)
    await _fails("volume_busy", api.clone_volume, "copy", "data", "s0")
    await _fails("volume_busy", api.delete_volume_snapshot, "data", "s0")
    assert [s.name for s in await call(api.list_volume_snapshots, "data")] == ["s0"]
    assert [v.name for v in await call(api.list_volumes)] == ["data"]
    await _set_desktop(farm, "d1", state="stopped", node_id=None)
    assert (await call(api.snapshot_volume, "data", "s1")).name == "s1"


async def test_the_qemu_image_lock_of_a_writer_is_volume_busy(farm: Farm) -> None:
    """What the rows miss (a process outside Deckard's knowledge writing the file), QEMU's lock catches."""
    api = await farm.admin_client()
    vol = await call(api.create_volume, "data", 1)
    writer = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "qcow2", str(_file(farm, vol.tenant_id, vol.id)),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.sleep(0.5)
        await _fails("volume_busy", api.snapshot_volume, "data", "s1")
        await _fails("volume_busy", api.delete_volume, "data")
    finally:
        writer.kill()
        await writer.wait()
    assert await call(api.list_volume_snapshots, "data") == []
    assert (await call(api.get_volume, "data")).state == "ready"


async def test_tenants_see_and_attach_only_their_own(farm: Farm) -> None:
    root = await farm.admin_client()
    await multitenant(root)
    a = await tenant_admin(farm, root, "acme", "ann", ["Tenant admin"])
    b = await tenant_admin(farm, root, "beta", "bob", ["Tenant admin"])
    for admin, user in ((a, "al"), (b, "bo")):
        await call(admin.create_osf, "vms", driver="vm")
        await call(admin.create_user, user, "pw-1234")
        await call(admin.create_desktop, f"{user}-desk", user, osf="vms")
    mine = await call(a.create_volume, "data", 1)
    theirs = await call(b.create_volume, "data", 1)
    assert mine.tenant_id != theirs.tenant_id
    assert [v.id for v in await call(a.list_volumes)] == [mine.id]
    await _fails("volume_not_found", b.get_volume, mine.id)
    await _fails("volume_not_found", b.delete_volume, mine.id)
    await _fails("volume_not_found", b.attach_volume, mine.id, "bo-desk")
    await _fails("desktop_not_found", a.attach_volume, "data", "bo-desk")
    # the farm's owner sees both; a volume is still attached only within its own tenant
    assert sorted(v.id for v in await call(root.list_volumes)) == sorted([mine.id, theirs.id])
    await _fails("desktop_not_found", root.attach_volume, mine.id, "bo-desk")
    assert (await call(a.attach_volume, "data", "al-desk")).attachments[0].desktop == "al-desk"


async def _play_node(farm: Farm, node_id: int, answer: Any) -> None:
    """The desktop's node: wait for one hot-plug command and ``answer`` it through node_ops."""
    for _ in range(200):
        changes = await node_ops.pending_volume_changes(farm.db, node_id)
        if changes:
            await answer(changes[0])
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no hot-plug command reached the node")


async def test_attach_and_detach_on_a_running_desktop_wait_for_its_node(farm: Farm) -> None:
    api = await farm.admin_client()
    await _vm_desktops(api, "d1")
    vol = await call(api.create_volume, "data", 1)
    node_id = await add_node(farm.db)
    await _set_desktop(farm, "d1", state="running", node_id=node_id)

    async def plug(change: node_ops.AttachedVolume) -> None:
        assert (change.volume_id, change.pending, change.read_only) == (vol.id, "attach", False)
        await node_ops.volume_plugged(farm.db, change.desktop_id, change.volume_id, live=True)

    attached, _ = await asyncio.gather(call(api.attach_volume, "data", "d1"), _play_node(farm, node_id, plug))
    assert [(x.pending, x.in_guest) for x in attached.attachments] == [(None, True)]

    async def held(change: node_ops.AttachedVolume) -> None:
        assert change.pending == "detach"
        message = "the guest has /dev/vdd mounted on /mnt: unmount it first"
        await node_ops.volume_change_failed(farm.db, change.desktop_id, change.volume_id, "volume_held", message)

    refused = asyncio.create_task(_fails("volume_held", api.detach_volume, "data", "d1"))
    await _play_node(farm, node_id, held)
    assert "unmount" in (await refused).message
    still = await call(api.get_volume, "data")
    assert [(x.pending, x.in_guest) for x in still.attachments] == [(None, True)]  # as it was

    async def unplug(change: node_ops.AttachedVolume) -> None:
        await node_ops.volume_unplugged(farm.db, change.desktop_id, change.volume_id)

    detached, _ = await asyncio.gather(call(api.detach_volume, "data", "d1"), _play_node(farm, node_id, unplug))
    assert detached.attachments == []


async def test_a_start_settles_the_commands_and_lists_the_volumes(farm: Farm) -> None:
    api = await farm.admin_client()
    await _vm_desktops(api, "d1")
    one = await call(api.create_volume, "one", 1)
    two = await call(api.create_volume, "two", 1)
    await call(api.attach_volume, "one", "d1")
    await call(api.attach_volume, "two", "d1", read_only=True)
    desktop_id = (await call(api.get_desktop, "d1")).id
    async with farm.db.begin() as conn:  # a detach asked for while the desktop was starting
        await conn.execute(
            sa.update(t.volume_attachments).where(t.volume_attachments.c.volume_id == two.id).values(pending="detach")
        )
    got = await node_ops.start_volumes(farm.db, desktop_id)
    assert [(v.volume_id, v.read_only) for v in got] == [(one.id, False)]
    assert (await call(api.get_volume, "two")).attachments == []


@pytest.mark.parametrize("bad", [{"size_gib": 0}, {"size_gib": 10**6}, {}])
async def test_bad_sizes_are_refused_before_anything_is_made(farm: Farm, bad: dict[str, Any]) -> None:
    api = await farm.admin_client()
    await call(api.create_volume, "ok", 1)
    with pytest.raises(BadInput):
        await call(api._send, "POST", "/volumes", json={"name": "x", **bad})
    assert [v.name for v in await call(api.list_volumes)] == ["ok"]
