"""Drivers by name: the node asks for "container", "vm", "fake" or several ("container,vm") and gets a :class:`Driver`.

Registered by name (as incus does in ``drivers/load.go``) so the configuration picks one and tests swap in
the fake without touching the node.  Each driver module is imported only when asked for.  Several names give a
:class:`~deckard.drivers.multi.MultiDriver`: one node running containers and VMs side by side.
"""

from __future__ import annotations

from deckard.drivers.base import Driver
from deckard.model.errors import BadInput
from deckard.runtime.paths import FarmPaths

DRIVER_NAMES = ("container", "vm", "fake")


def load_driver(name: str, paths: FarmPaths, *, fake_start_delay: float = 0.0, vm_accel: str = "auto") -> Driver:
    """Return the driver called ``name`` (or a comma-separated list of them) for this farm; BadInput for an
    unknown name.  ``fake_start_delay`` is the fake driver's simulated boot time (``deckard up
    --fake-start-delay``); ``vm_accel`` is the VM driver's accelerator (auto: KVM when a probe shows it works)."""
    names = [n.strip() for n in name.split(",") if n.strip()]
    if len(names) > 1:
        from deckard.drivers.multi import MultiDriver

        if len(set(names)) != len(names) or "fake" in names:
            raise BadInput(f"bad driver list {name!r}: name each of container and vm once", code="unknown_driver")
        return MultiDriver({n: load_driver(n, paths, vm_accel=vm_accel) for n in names})
    if names == ["container"]:
        from deckard.drivers.container import ContainerDriver

        return ContainerDriver(paths)
    if names == ["vm"]:
        from deckard.drivers.vm import VmDriver

        return VmDriver(paths, accel=vm_accel)
    if names == ["fake"]:
        from deckard.drivers.fake import FakeDriver

        return FakeDriver(paths, start_delay=fake_start_delay)
    raise BadInput(f"unknown driver {name!r}; choose one of: {', '.join(DRIVER_NAMES)}", code="unknown_driver")
