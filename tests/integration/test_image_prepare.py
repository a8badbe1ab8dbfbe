"""Images registered with their profile, and the node's image loop: every image a tag points at is made ready
(unpacked) once, ahead of its first desktop, one at a time; untagged, blocked and other drivers' images are not."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import DriverError
from deckard.node.images import ImagePreparer
from deckard.services import images
from deckard.services.context import SYSTEM
from deckard.services.tenancy import bootstrap_farm


class RecordingDriver:
    """A driver that only records what it was asked to prepare (and fails for files that do not exist)."""

    name = "container"

    def __init__(self) -> None:
        self.prepared: list[tuple[int, Path]] = []
        self.running = 0
        self.most_at_once = 0

    async def prepare_image(self, image_id: int, image_path: Path) -> None:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(0.01)
            if not image_path.exists():
                raise DriverError(f"{image_path} does not exist", code="image_missing")
            self.prepared.append((image_id, image_path))
        finally:
            self.running -= 1


def image_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.tar.zst"
    path.write_bytes(b"not really an image")
    return path


async def test_an_image_is_registered_with_its_profile_and_keeps_it(db: Database, tmp_path: Path) -> None:
    await bootstrap_farm(db)
    std = await images.register_image(db, image_file(tmp_path, "std"), version="std-1", profile="standard")
    assert std["profile"] == "standard"
    unknown = await images.register_image(db, image_file(tmp_path, "other"), version="other-1", tags=("other",))
    assert unknown["profile"] == ""
    # registering the same version again without a profile does not forget the one it had
    again = await images.register_image(db, image_file(tmp_path, "std"), version="std-1")
    assert again["profile"] == "standard"
    rows, _ = await images.list_images(db, SYSTEM)
    assert {r["version"]: r["profile"] for r in rows} == {"std-1": "standard", "other-1": ""}


async def test_the_node_prepares_each_tagged_image_once_and_nothing_else(db: Database, tmp_path: Path) -> None:
    await bootstrap_farm(db)
    first = await images.register_image(db, image_file(tmp_path, "a"), version="a", profile="minimal")
    second = await images.register_image(db, image_file(tmp_path, "b"), version="b", tags=("standard",))
    untagged = await images.register_image(db, image_file(tmp_path, "c"), version="c", tags=("old",))
    blocked = await images.register_image(db, image_file(tmp_path, "d"), version="d", tags=("blocked",))
    async with db.begin() as conn:
        await conn.execute(sa.delete(t.image_tags).where(t.image_tags.c.tag == "old"))
        await conn.execute(sa.update(t.disk_images).where(t.disk_images.c.id == blocked["id"]).values(blocked=True))

    driver = RecordingDriver()
    preparer = ImagePreparer(db, driver)  # type: ignore[arg-type]
    assert await preparer.pass_once() == 2
    assert [image_id for image_id, _ in driver.prepared] == [second["id"], first["id"]]  # newest first
    assert driver.most_at_once == 1  # one at a time: a desktop start is never crowded out
    assert untagged["id"] not in preparer.prepared and blocked["id"] not in preparer.prepared

    assert await preparer.pass_once() == 0  # a pass over prepared images does no work
    # a tag moved onto an image: the next pass prepares it
    async with db.begin() as conn:
        await images.move_tag(conn, int(untagged["osf_id"]), "standard", int(untagged["id"]))
    assert await preparer.pass_once() == 1 and driver.prepared[-1][0] == untagged["id"]


async def test_a_missing_image_file_is_retried_until_it_appears(db: Database, tmp_path: Path) -> None:
    await bootstrap_farm(db)
    path = image_file(tmp_path, "late")
    image = await images.register_image(db, path, version="late")
    path.unlink()
    driver = RecordingDriver()
    preparer = ImagePreparer(db, driver)  # type: ignore[arg-type]
    assert await preparer.pass_once() == 0 and await preparer.pass_once() == 0
    path.write_bytes(b"here now")
    assert await preparer.pass_once() == 1 and driver.prepared == [(image["id"], path)]


async def test_only_images_of_the_nodes_driver_are_prepared(db: Database, tmp_path: Path) -> None:
    await bootstrap_farm(db)
    await images.register_image(db, image_file(tmp_path, "a"), version="a")
    assert len(await images.images_to_prepare(db, "container")) == 1
    assert await images.images_to_prepare(db, "fake") == []


async def test_the_loop_stops_when_asked(db: Database, tmp_path: Path) -> None:
    await bootstrap_farm(db)
    await images.register_image(db, image_file(tmp_path, "a"), version="a")
    driver = RecordingDriver()
    stop = asyncio.Event()
    task = asyncio.create_task(ImagePreparer(db, driver, every_s=0.05).run(stop))  # type: ignore[arg-type]
    for _ in range(200):
        if driver.prepared:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert len(driver.prepared) == 1  # prepared at start, then remembered
