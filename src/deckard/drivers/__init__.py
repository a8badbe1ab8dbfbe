"""Drivers by name: the node asks for "container", "vm" or "fake" and gets a :class:`Driver`.

Registered by name (as incus does in ``drivers/load.go``) so the configuration picks one and tests swap in
the fake without touching the node.  Each driver module is imported only when asked for.
"""

from __future__ import annotations

from deckard.drivers.base import Driver
from deckard.model.errors import BadInput
from deckard.runtime.paths import FarmPaths

DRIVER_NAMES = ("container", "fake")


def load_driver(name: str, paths: FarmPaths) -> Driver:
    """Return the driver called ``name`` for this farm; BadInput for an unknown name."""
    if name == "container":
        from deckard.drivers.container import ContainerDriver

        return ContainerDriver(paths)
    if name == "fake":
        from deckard.drivers.fake import FakeDriver

        return FakeDriver(paths)
    raise BadInput(f"unknown driver {name!r}; choose one of: {', '.join(DRIVER_NAMES)}", code="unknown_driver")
