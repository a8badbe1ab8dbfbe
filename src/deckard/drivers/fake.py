"""The fake driver: desktops that exist only in memory.

It lets the node, the broker and the API run at scale (thousands of desktops on one laptop) and in
development without root or LXC, as the ``nothing`` backend does in QVD and the mock driver in incus.
There is no guest and no agent: a started desktop is a record that ``inspect``/``list`` report as
running until it is stopped or killed.  ``has_agent = False`` tells the node to skip the agent wait and pings
(the start path completes as soon as the record exists), and the node's death (``kill -9``) takes its fake
guests with it, as fencing expects of a real node.  A restart in place keeps them, as it keeps real guests:
``handover`` writes them to the node's run directory and the next process's driver takes them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from pathlib import Path

from deckard.drivers.base import GuestInfo, GuestSpec
from deckard.runtime.paths import FarmPaths

FAKE_MEMORY_BYTES = 64 * 1024 * 1024


class FakeDriver:
    """In-memory guests; every method is idempotent like the real drivers."""

    name = "fake"
    has_agent = False  # no guest agent: the node does not wait for one nor ping it

    def __init__(self, paths: FarmPaths, *, start_delay: float = 0.0) -> None:
        self.paths = paths
        self.start_delay = start_delay  # simulated boot time, for tests of waiting and progress
        self.guests: dict[str, GuestSpec] = {}
        self._next_pid = 10_000
        handed = self._handover_file
        with contextlib.suppress(FileNotFoundError):
            for g in json.loads(handed.read_text()):
                g.update(image_path=Path(g["image_path"]), home_dir=Path(g["home_dir"]))
                self.guests[g["guest_name"]] = GuestSpec(**g)
            handed.unlink()

    @property
    def _handover_file(self) -> Path:
        return self.paths.node_run_dir / "fake-guests.json"

    async def handover(self) -> None:
        """The daemon restarts in place: leave the guests to the next process (real guests outlive it anyway)."""
        self.paths.node_run_dir.mkdir(parents=True, exist_ok=True)
        self._handover_file.write_text(json.dumps([dataclasses.asdict(g) for g in self.guests.values()], default=str))

    async def start(self, spec: GuestSpec) -> GuestInfo:
        if spec.guest_name not in self.guests:
            if self.start_delay:
                await asyncio.sleep(self.start_delay)
            self.guests[spec.guest_name] = spec
            self._next_pid += 1
        info = await self.inspect(spec.guest_name)
        assert info is not None
        return info

    async def stop(self, guest_name: str, timeout: float = 10.0) -> None:
        self.guests.pop(guest_name, None)

    async def kill(self, guest_name: str) -> None:
        self.guests.pop(guest_name, None)

    async def inspect(self, guest_name: str) -> GuestInfo | None:
        spec = self.guests.get(guest_name)
        if spec is None:
            return None
        return GuestInfo(guest_name=guest_name, running=True, ip=spec.ip, memory_bytes=FAKE_MEMORY_BYTES)

    async def list(self) -> list[GuestInfo]:
        prefix = self.paths.guest_prefix()
        infos = [await self.inspect(name) for name in sorted(self.guests) if name.startswith(prefix)]
        return [info for info in infos if info is not None]
