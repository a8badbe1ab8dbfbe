"""The fake driver: desktops that are a few sockets on loopback, in the node's own process.

It lets the node, the broker and the API run without root or LXC (development, integration tests, chaos
tests of farms), as the ``nothing`` backend does in QVD and the mock driver does in incus.  A started desktop
is a :class:`~deckard.drivers.fake_guest.FakeGuest`: the real guest agent's RPC on ``<ip>:3030`` over a
pretend X session, and a display with VNC authentication on ``<ip>:5900`` once ``x_start`` asked for it.  So the
node runs its whole agent path against it (wait for the agent, pings, zombie, poweroff) and the broker its
whole connect path.  Its desktops need loopback addresses: the farm's desktop network must be in 127.0.0.0/8.

Faults are injected through the driver object, as incus's mock does: ``start_delay`` (a slow boot),
``start_error`` (every start fails), ``x_start_error`` (the agents started from now on refuse ``x_start``),
``agent_delay`` (their agents answer late) and ``display_at_boot`` (their display is up at boot, as a container's
boot script has it), and
per guest ``guest(name).kill_agent()`` (the agent dies, the guest runs on) and ``guest(name).exit()`` (the
guest shuts down from inside).

The guests live in the process, so a node killed with ``-9`` takes them along, as fencing expects of a dead
node.  A restart in place keeps them, as it keeps real guests: ``close`` (the daemon is done with the driver)
writes the guests still running to the node's run directory, and the next driver of this node, in the
re-executed process or in the same one, brings them back up with the same token and display before it
answers anything, so the new daemon adopts them through their agent like real guests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
from pathlib import Path
from typing import Any

import structlog

from deckard.drivers.base import AGENT_PORT, GuestInfo, GuestSpec, VolumeMount
from deckard.drivers.fake_guest import FakeGuest
from deckard.model.errors import DriverError
from deckard.runtime.paths import FarmPaths

log = structlog.get_logger()

FAKE_MEMORY_BYTES = 64 * 1024 * 1024


class FakeDriver:
    """Loopback guests; every method is idempotent like the real drivers."""

    name = "fake"

    def __init__(self, paths: FarmPaths, *, start_delay: float = 0.0) -> None:
        self.paths = paths
        self.start_delay = start_delay  # simulated boot time, for tests of waiting and progress
        self.start_error: str | None = None  # every start fails with this message (a broken image, a full disk)
        self.x_start_error: str | None = None  # agents started from now on answer x_start with x_start_failed
        self.agent_delay = 0.0  # the agents of guests started from now on answer this many seconds after boot
        self.display_at_boot = False  # guests started from now on show their user's display at boot (a boot script)
        self.guests: dict[str, FakeGuest] = {}
        self._resumed = False  # the guests handed over by the previous driver of this node are back up

    def guest(self, guest_name: str) -> FakeGuest:
        """The guest called ``guest_name`` (KeyError when there is none): for tests to look at or break."""
        return self.guests[guest_name]

    @property
    def _handover_file(self) -> Path:
        return self.paths.node_run_dir / "fake-guests.json"

    async def _resume(self) -> None:
        """Bring back the guests the previous driver of this node handed over at its ``close``."""
        if self._resumed:
            return
        self._resumed = True
        try:
            records: list[dict[str, Any]] = json.loads(self._handover_file.read_text())
        except FileNotFoundError:
            return
        self._handover_file.unlink()
        for record in records:
            x_user, x_uid, agent_alive = record.pop("x_user"), record.pop("x_uid"), record.pop("agent_alive")
            volumes = tuple(VolumeMount(**{**v, "path": Path(v["path"])}) for v in record.pop("volumes", []))
            spec = GuestSpec(
                **{**record, "image_path": Path(record["image_path"]), "home_dir": Path(record["home_dir"])},
                volumes=volumes,
            )
            try:
                guest = await self._launch(spec)
                if not agent_alive:
                    guest.kill_agent()  # a restart does not bring a dead agent back
                if x_user is not None:
                    guest.resume_display(x_user, x_uid)
            except (DriverError, OSError) as e:  # the node converges: its desktop is stopped
                log.warning("fake.resume_failed", guest=spec.guest_name, error=str(e))
        log.info("fake.resumed", guests=len(self.guests))

    async def console_log(self, guest_name: str, max_bytes: int = 65536) -> str:  # noqa: ARG002
        return ""  # a fake guest has no console

    async def close(self) -> None:
        if not self._resumed:
            return  # nothing was taken back, so a hand-over file stays as it is
        handed = [
            {
                **dataclasses.asdict(g.spec),
                "x_user": g.agent.x.user,
                "x_uid": g.agent.x.uid,
                "agent_alive": g.agent_alive,
            }
            for g in self.guests.values()
            if g.running
        ]
        for guest in self.guests.values():
            guest.exit()
        self.guests.clear()
        self._resumed = False  # the same object used again takes them back, as a new one would
        if handed:
            self.paths.node_run_dir.mkdir(parents=True, exist_ok=True)
            self._handover_file.write_text(json.dumps(handed, default=str))

    async def _launch(self, spec: GuestSpec) -> FakeGuest:
        if not ipaddress.ip_address(spec.ip).is_loopback:
            raise DriverError(
                f"the fake driver serves desktops on loopback and {spec.ip} is not a loopback address:"
                " give the farm a desktop network in 127.0.0.0/8 (network.range, e.g. 127.77.0.0/22)",
                code="fake_needs_loopback",
            )
        guest = FakeGuest(spec, x_start_error=self.x_start_error)
        try:
            await guest.boot(agent_delay=self.agent_delay, display=self.display_at_boot and not spec.warm)
        except OSError as e:
            raise DriverError(
                f"cannot bind the fake desktop's agent on {spec.ip}:{AGENT_PORT} ({e.strerror})",
                code="fake_bind_failed",
            ) from None
        self.guests[spec.guest_name] = guest
        return guest

    async def prepare_image(self, image_id: int, image_path: Path) -> None:
        """Nothing to unpack: a fake guest never reads its image."""

    async def start(self, spec: GuestSpec) -> GuestInfo:
        await self._resume()
        guest = self.guests.get(spec.guest_name)
        if guest is None or not guest.running or guest.spec != spec:
            if self.start_delay:
                await asyncio.sleep(self.start_delay)
            if self.start_error:
                raise DriverError(self.start_error, code="fake_start_failed")
            await self.kill(spec.guest_name)  # what is left of an earlier start
            guest = await self._launch(spec)
        return self._info(guest)

    async def stop(self, guest_name: str, timeout: float = 10.0) -> None:  # noqa: ARG002 (nothing to wait for)
        await self.kill(guest_name)  # a fake guest has nothing to save: powering off is ending it

    async def kill(self, guest_name: str) -> None:
        await self._resume()
        guest = self.guests.pop(guest_name, None)
        if guest is not None:
            guest.exit()

    async def inspect(self, guest_name: str) -> GuestInfo | None:
        await self._resume()
        guest = self.guests.get(guest_name)
        return None if guest is None else self._info(guest)

    async def list(self) -> list[GuestInfo]:
        await self._resume()
        prefix = self.paths.guest_prefix()
        return [self._info(g) for name, g in sorted(self.guests.items()) if name.startswith(prefix)]

    async def attach_volume(self, guest_name: str, volume: VolumeMount) -> bool:  # noqa: ARG002
        """A fake guest has no disks: the volume is in its spec from its next start on."""
        if guest_name not in self.guests:
            raise DriverError(f"no fake guest {guest_name}", code="guest_not_running")
        return False

    async def detach_volume(self, guest_name: str, volume_id: int) -> bool:  # noqa: ARG002
        return False

    @staticmethod
    def _info(guest: FakeGuest) -> GuestInfo:
        running = guest.running
        return GuestInfo(
            guest_name=guest.spec.guest_name,
            running=running,
            ip=guest.spec.ip,
            memory_bytes=FAKE_MEMORY_BYTES if running else None,
            display_at_boot=guest.display_at_boot,
        )
