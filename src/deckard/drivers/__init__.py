"""Drivers by name: the node asks for "container", "vm" or "fake" and gets a :class:`Driver`.

Registered by name (as incus does in ``drivers/load.go``) so the configuration picks one and tests swap in
the fake without touching the node.  Each driver module is imported only when asked for.
"""

from __future__ import annotations

from deckard.drivers.base import Driver
from deckard.model.errors import BadInput
from deckard.runtime.paths import FarmPaths

DRIVER_NAMES = ("container", "fake")


def load_driver(name: str, paths: FarmPaths, *, fake_start_delay: float = 0.0) -> Driver:
    """Return the driver called ``name`` for this farm; BadInput for an unknown name.  ``fake_start_delay`` is the
    fake driver's simulated boot time (``deckard up --fake-start-delay``); other drivers boot for real."""
    if name == "container":
        from deckard.drivers.container import ContainerDriver

        return ContainerDriver(paths)
    if name == "fake":
        from deckard.drivers.fake import FakeDriver

        return FakeDriver(paths, start_delay=fake_start_delay)
    raise BadInput(f"unknown driver {name!r}; choose one of: {', '.join(DRIVER_NAMES)}", code="unknown_driver")
