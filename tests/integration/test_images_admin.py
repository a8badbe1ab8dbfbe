"""Disk images and OSFs through the real API (TLS, uvicorn, SQLite and PostgreSQL): restartable uploads, bad
tarballs, import, atomic publish with expiry on running desktops, tags, delete rules and OSF CRUD."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import test_api
from test_api import Farm, call

from deckard.client.api import ApiClient
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.images import builder
from deckard.images.profile import VM_PACKAGES
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Conflict
from deckard.model.schemas import Image

farm = test_api.farm  # the real API with TLS, shared with test_api.py


def rootfs_tar(size: int = 300_000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = bytes(range(256)) * (size // 256)
        info = tarfile.TarInfo("etc/payload")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def ready_image(api: ApiClient, version: str, tmp_path: Path) -> Image:
    """An image imported by the supertenant's admin from the farm's import directory (``<home>/import``)."""
    (tmp_path / "import").mkdir(exist_ok=True)
    src = tmp_path / "import" / f"{version}.tar.gz"
    src.write_bytes(rootfs_tar(1000))
    row = await call(api.create_image, version, source="import", path=str(src))
    assert row.state == "ready", row
    return row


async def add_desktop(db: Database, name: str, ip: str, *, image_id: int | None, state: str = "running") -> int:
    async with db.begin() as conn:
        tenant = (await conn.execute(sa.select(t.tenants.c.id).where(t.tenants.c.name == "default"))).scalar_one()
        osf = (await conn.execute(sa.select(t.osfs.c.id).where(t.osfs.c.name == "default"))).scalar_one()
        user = (await conn.execute(sa.select(t.users.c.id).where(t.users.c.login == "alice"))).scalar()
        if user is None:
            user = (
                await conn.execute(
                    sa.insert(t.users)
                    .values(tenant_id=tenant, login="alice", created_at=utcnow())
                    .returning(t.users.c.id)
                )
            ).scalar_one()
        res = await conn.execute(
            sa.insert(t.desktops)
            .values(
                tenant_id=tenant,
                name=name,
                user_id=user,
                osf_id=osf,
                tag="default",
                ip=ip,
                mac="02:00:00:00:00:01",
                created_at=utcnow(),
                state=state,
                image_id=image_id,
            )
            .returning(t.desktops.c.id)
        )
        return int(res.scalar_one())


async def desktop_row(db: Database, desktop_id: int) -> Any:
    async with db.connect() as conn:
        return (await conn.execute(sa.select(t.desktops).where(t.desktops.c.id == desktop_id))).one()


async def test_an_upload_in_two_chunks_survives_a_restart_and_ends_ready(farm: Farm, tmp_path: Path) -> None:
    """The first chunk lands, a misplaced chunk is refused with the expected offset, the rest resumes."""
    api = await farm.admin_client()
    data = rootfs_tar()
    image = await call(api.create_image, "v1")
    assert image.state == "new"
    half = len(data) // 2
    row = await call(api.upload_image_chunk, image.id, data[:half], start=0, total=len(data))
    assert row.state == "uploading" and row.uploaded_bytes == half
    with pytest.raises(Conflict) as e:
        await call(api.upload_image_chunk, image.id, data[half + 10 :], start=half + 10, total=len(data))
    assert e.value.code == "bad_offset" and e.value.details["expected"] == half
    assert (await call(api.get_image, image.id)).uploaded_bytes == half
    src = tmp_path / "rootfs.tar.gz"
    src.write_bytes(data)
    seen: list[int] = []
    row = await call(api.upload_image, image.id, src, chunk_size=1 << 16, progress=lambda d, _t: seen.append(d))
    assert seen[0] == half  # resumed, not restarted
    assert row.state == "ready" and row.digest == hashlib.sha256(data).hexdigest() and row.size == len(data)
    assert Path(row.path).read_bytes() == data and Path(row.path).name == f"{image.id}.tar.gz"
    assert not (tmp_path / "storage" / "images" / f"{image.id}.partial").exists()


async def test_a_file_that_is_not_a_tarball_fails_the_image_with_the_reason(farm: Farm) -> None:
    api = await farm.admin_client()
    image = await call(api.create_image, "junk")
    junk = b"this is not a tarball at all" * 100
    row = await call(api.upload_image_chunk, image.id, junk, start=0, total=len(junk))
    assert row.state == "failed" and "not a tar archive" in row.status_message
    with pytest.raises(Conflict) as e:
        await call(api.upload_image_chunk, image.id, junk, start=0, total=len(junk))
    assert e.value.code == "bad_image_state"  # a failed image stays failed: create another version


async def test_import_copies_a_tarball_from_the_import_directory(farm: Farm, tmp_path: Path) -> None:
    api = await farm.admin_client()
    row = await ready_image(api, "imported", tmp_path)
    assert Path(row.path).parent == tmp_path / "storage" / "images" and row.uploaded_bytes == row.size


async def test_publish_moves_tags_together_and_sets_expiry_on_desktops_of_the_old_image(
    farm: Farm, tmp_path: Path
) -> None:
    api = await farm.admin_client()
    old = await ready_image(api, "old", tmp_path)
    await call(api.publish_image, old.id, ["default", "head"])
    new = await ready_image(api, "new", tmp_path)
    on_old = await add_desktop(farm.db, "d-old", "10.231.0.50", image_id=old.id)
    stopped = await add_desktop(farm.db, "d-stopped", "10.231.0.51", image_id=old.id, state="stopped")
    on_new = await add_desktop(farm.db, "d-new", "10.231.0.52", image_id=new.id)
    out = await call(api.publish_image, new.id, ["default", "head"], expire_soft_s=60, expire_hard_s=600)
    assert out.state == "published" and out.tags == ["default", "head"]
    assert out.expiring_desktops == [on_old]
    images = {r.id: r for r in await call(api.list_images)}
    assert images[old.id].tags == [] and images[new.id].tags == ["default", "head"]
    row = await desktop_row(farm.db, on_old)
    soft, hard = row.expire_soft_at, row.expire_hard_at
    assert soft is not None and hard is not None and (hard - soft).total_seconds() == 540
    for other in (stopped, on_new):
        assert (await desktop_row(farm.db, other)).expire_hard_at is None
    # publishing again gives no extra time
    await call(api.publish_image, old.id, ["default"], expire_soft_s=3600, expire_hard_s=7200)
    assert (await desktop_row(farm.db, on_old)).expire_hard_at == hard


async def test_a_tag_points_at_one_image_per_osf_and_tagged_images_are_not_deleted(farm: Farm, tmp_path: Path) -> None:
    api = await farm.admin_client()
    a = await ready_image(api, "a", tmp_path)
    b = await ready_image(api, "b", tmp_path)
    await call(api.tag_image, a.id, "stable")
    await call(api.tag_image, b.id, "stable")  # moves, never duplicates
    assert (await call(api.get_image, a.id)).tags == []
    assert (await call(api.get_image, b.id)).tags == ["stable"]
    with pytest.raises(Conflict) as e:
        await call(api.delete_image, b.id)
    assert e.value.code == "image_tagged"
    path = Path(b.path)
    await call(api.untag_image, b.id, "stable")
    await call(api.delete_image, b.id)
    assert not path.exists()
    assert [r.id for r in await call(api.list_images, state="ready")] == [a.id]


async def test_osf_crud_and_delete_refused_while_used(farm: Farm) -> None:
    api = await farm.admin_client()
    osf = await call(api.create_osf, "web", memory_mib=2048, cpus=2, description="browsers")
    assert osf.memory_mib == 2048 and osf.driver == "container"
    assert (await call(api.update_osf, "web", memory_mib=512)).memory_mib == 512
    assert (await call(api.get_osf, osf.id)).description == "browsers"
    with pytest.raises(Conflict) as dup:
        await call(api.create_osf, "web")
    assert dup.value.code == "duplicate"
    image = await call(api.create_image, "w1", osf="web")
    with pytest.raises(Conflict) as e:
        await call(api.delete_osf, "web")
    assert e.value.code == "has_dependents" and e.value.details == {"desktops": 0, "images": 1}
    await call(api.delete_image, image.id)
    await call(api.delete_osf, "web")
    assert [o.name for o in await call(api.list_osfs)] == ["default"]


async def test_a_build_names_its_profile_and_a_bad_one_is_refused_before_it_starts(farm: Farm) -> None:
    api = await farm.admin_client()
    row = await call(api.create_image, "b1")
    with pytest.raises(BadInput) as e:
        await call(api.build_image, int(row.id or 0), "no-such-profile")
    assert e.value.code == "unknown_profile"
    with pytest.raises(BadInput) as e:
        await call(api.build_image, int(row.id or 0), "minimal", ["bad package; rm -rf /"])
    assert e.value.code == "bad_package"
    with pytest.raises(BadInput) as e:
        await call(api.create_image, "b2", source="build", build_profile="nope")
    assert e.value.code == "unknown_profile"
    assert (await call(api.get_image, int(row.id or 0))).state == "new"  # nothing started
    assert not any(i.version == "b2" for i in await call(api.list_images))


async def test_a_vm_build_reaches_the_builder_as_one_more_vm_layer_and_keeps_its_profile_name(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The builder itself is stubbed (no debootstrap here): what is under test is the API handing it the profile."""
    seen: list[Any] = []

    async def fake_build(output_dir: Path, *, progress: Any, profile: Any, **_: Any) -> Path:
        seen.append(profile)
        progress("apt: installing", 0.5)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / builder.image_filename(profile)
        path.write_bytes(rootfs_tar(1000))
        return path

    monkeypatch.setattr(builder, "build_image", fake_build)

    async def built(image_id: int) -> Image:
        for _ in range(100):
            row = await call(api.get_image, image_id)
            if row.state != "building":
                return row
            await asyncio.sleep(0.05)
        raise AssertionError(f"image {image_id} still building")

    api = await farm.admin_client()
    row = await call(api.create_image, "vm1")
    await call(api.build_image, int(row.id or 0), "minimal", ["htop"], format="vm")
    done = await built(int(row.id or 0))
    assert done.state == "ready" and done.profile == "minimal"
    vm = seen[-1]
    assert (
        vm.vm and vm.packages == VM_PACKAGES and vm.parent.packages == ("htop",) and vm.parent.parent.name == "minimal"
    )

    row = await call(api.create_image, "vm2", source="build", build_profile="minimal", build_format="vm")
    assert (await built(int(row.id or 0))).state == "ready" and seen[-1].is_vm and seen[-1].name == "minimal"

    row = await call(api.create_image, "c1", source="build", build_profile="minimal")
    assert (await built(int(row.id or 0))).state == "ready" and not seen[-1].is_vm  # container is the default

    with pytest.raises(BadInput):
        await call(api.create_image, "bad", source="build", build_format="floppy")
    assert len(seen) == 3 and not any(i.version == "bad" for i in await call(api.list_images))
