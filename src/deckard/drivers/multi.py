"""Several drivers behind one: a node that runs containers and virtual machines side by side.

The node holds one :class:`MultiDriver` (``load_driver("container,vm")``).  A start goes to the driver its
:class:`GuestSpec` names (the OSF's); everything else finds the guest's driver by asking each one, since
every driver keeps its guests in a directory of its own.  The node registers under the joined name
(``container,vm``), which is what placement matches an OSF's driver against (``model/placement.serves``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from deckard.drivers.base import Driver, GuestInfo, GuestSpec, VolumeMount, WarmDriver
from deckard.model.errors import DriverError


class MultiDriver:
    def __init__(self, drivers: Mapping[str, Driver]) -> None:
        if not drivers:
            raise ValueError("a node needs at least one driver")
        self.drivers = dict(drivers)
        self.name = ",".join(self.drivers)

    def _for_spec(self, spec: GuestSpec) -> Driver:
        kind = spec.driver or next(iter(self.drivers))
        driver = self.drivers.get(kind)
        if driver is None:
            raise DriverError(
                f"this node runs {self.name} desktops, not {kind}: start it on a node with the {kind} driver",
                code="driver_unavailable",
            )
        return driver

    async def _owner(self, guest_name: str) -> tuple[Driver, GuestInfo] | None:
        for driver in self.drivers.values():
            info = await driver.inspect(guest_name)
            if info is not None:
                return driver, info
        return None

    async def prepare_image(self, image_id: int, image_path: Path) -> None:
        """Prepare for every driver (the node's image loop calls each driver for its own OSFs instead)."""
        for driver in self.drivers.values():
            await driver.prepare_image(image_id, image_path)

    async def start(self, spec: GuestSpec) -> GuestInfo:
        return await self._for_spec(spec).start(spec)

    async def take_over(
        self, guest_name: str, *, ip: str, prefix_len: int, gateway: str, home_dir: Path, login: str, uid: int
    ) -> None:
        # straight to the driver that keeps warm guests, which checks the guest itself: asking each driver whose
        # guest it is first (``_owner``: lxc-info) put ~20 ms on the user's clock
        warm = [driver for driver in self.drivers.values() if isinstance(driver, WarmDriver)]
        if not warm:
            raise DriverError(f"{guest_name} is not a running warm guest", code="guest_exited")
        await warm[0].take_over(
            guest_name, ip=ip, prefix_len=prefix_len, gateway=gateway, home_dir=home_dir, login=login, uid=uid
        )

    async def stop(self, guest_name: str, timeout: float = 10.0) -> None:
        owner = await self._owner(guest_name)
        if owner is not None:
            await owner[0].stop(guest_name, timeout)
        else:
            await self.kill(guest_name)

    async def kill(self, guest_name: str) -> None:
        owner = await self._owner(guest_name)
        if owner is not None:
            await owner[0].kill(guest_name)
            return
        # nothing known: let every driver clean up what a half-done start may have left
        await asyncio.gather(*(d.kill(guest_name) for d in self.drivers.values()))

    async def inspect(self, guest_name: str) -> GuestInfo | None:
        owner = await self._owner(guest_name)
        return owner[1] if owner is not None else None

    async def list(self) -> list[GuestInfo]:
        lists = await asyncio.gather(*(d.list() for d in self.drivers.values()))
        return [info for infos in lists for info in infos]

    async def console_log(self, guest_name: str, max_bytes: int = 65536) -> str:
        for driver in self.drivers.values():
            text = await driver.console_log(guest_name, max_bytes)
            if text:
                return text
        return ""

    async def attach_volume(self, guest_name: str, volume: VolumeMount) -> bool:
        owner = await self._owner(guest_name)
        if owner is None:
            raise DriverError(f"no guest {guest_name} on this node", code="guest_not_running")
        return await owner[0].attach_volume(guest_name, volume)

    async def detach_volume(self, guest_name: str, volume_id: int) -> bool:
        owner = await self._owner(guest_name)
        return True if owner is None else await owner[0].detach_volume(guest_name, volume_id)

    async def close(self) -> None:
        for driver in self.drivers.values():
            await driver.close()
