"""The node's image loop: unpack the images that tags point at before a desktop needs them.

Without it the first desktop of a new image pays for the unpacking (6.4 s for the first desktop after
``deckard up`` with the minimal image, far more with ``standard``), while the user waits.  So the node asks
its driver to prepare (``Driver.prepare_image``: the container driver unpacks and shifts the image) every
image a tag points at in an OSF of its driver: at node start, and whenever an image changes (an admin event on
this process's bus: publish, tag, build) or, at the latest, every ``every_s`` (an image registered by
another process, ``deckard image import`` with SQLite, sends no event here).

One image at a time and at low priority (tar runs niced): a desktop start never waits for this loop except
for the image it needs itself, and then it waits on the same lock and finds the work done, not done twice.
What the loop prepared is remembered by image id and path, so a pass over prepared images costs one small
query.  Unpacked images no tag points at any more stay on disk (``docs/images.md``: removing them safely
needs to know that no starting desktop still uses them; not done yet).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import structlog

from deckard.db.engine import Database
from deckard.drivers.base import Driver
from deckard.drivers.multi import MultiDriver
from deckard.model.errors import DeckardError
from deckard.services.events import EVENTS
from deckard.services.images import images_to_prepare

log = structlog.get_logger()

CHECK_EVERY_S = 5.0


class ImagePreparer:
    def __init__(self, db: Database, driver: Driver, *, every_s: float = CHECK_EVERY_S) -> None:
        self.db = db
        # a node running several kinds of guest prepares each OSF's images for that OSF's driver only
        self.drivers: dict[str, Driver] = {driver.name: driver}
        if isinstance(driver, MultiDriver):
            self.drivers = dict(driver.drivers)
        self.every_s = every_s
        self.prepared: dict[tuple[str, int], Path] = {}  # (driver, image id) → the file it was prepared from
        self._failed: dict[tuple[str, int], Path] = {}  # logged once per image file, tried again at every pass

    async def run(self, stop: asyncio.Event) -> None:
        async with self.db.bus.subscribe(EVENTS) as sub:
            while not stop.is_set():
                try:
                    await self.pass_once(stop)
                except Exception as e:  # database away: the desktops go on, try again later
                    log.warning("node.image_prepare_failed", error=str(e))
                deadline = time.monotonic() + self.every_s
                while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                    if _about_an_image(await sub.wait(min(left, 1.0))):
                        break

    async def pass_once(self, stop: asyncio.Event | None = None) -> int:
        """Prepare every tagged image not prepared yet; return how many this pass prepared."""
        done = 0
        for kind, driver in self.drivers.items():
            for image_id, path in await images_to_prepare(self.db, kind):
                if stop is not None and stop.is_set():
                    return done
                key = (kind, image_id)
                if self.prepared.get(key) == path:
                    continue
                t0 = time.monotonic()
                try:
                    await driver.prepare_image(image_id, path)
                except DeckardError as e:
                    if self._failed.get(key) != path:
                        log.warning(
                            "node.image_not_prepared", image_id=image_id, driver=kind, path=str(path), error=e.message
                        )
                        self._failed[key] = path
                    continue
                self._failed.pop(key, None)
                self.prepared[key] = path
                done += 1
                log.info("node.image_prepared", image_id=image_id, driver=kind, seconds=round(time.monotonic() - t0, 2))
        return done


def _about_an_image(payload: str | None) -> bool:
    if not payload:
        return False
    try:
        return bool(json.loads(payload).get("object") == "image")
    except (ValueError, AttributeError):
        return False


async def run_image_loop(db: Database, driver: Driver, stop: asyncio.Event, every_s: float = CHECK_EVERY_S) -> None:
    await ImagePreparer(db, driver, every_s=every_s).run(stop)
