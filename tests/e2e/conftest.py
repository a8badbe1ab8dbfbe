"""End-to-end fixtures: a real all-in-one farm (LXC desktops) started through the CLI as a user would."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deckard.testing import (
    CHROMIUM,
    CHROMIUM_ARGS,
    FarmProcess,
    browser_unavailable_reason,
    e2e_unavailable_reason,
    image_cache,
    wait_for,
)


class SharedFarm:
    """The farm that the modules saying ``SHARED_FARM = True`` take turns on, one per test process.

    A farm costs 15-25 s to bring up and down (``deckard up`` unpacks the image, ``deckard down`` stops every
    desktop), paid again by every module that only needs "a farm".  Those modules use users and desktops of
    their own names and restore what farm-wide settings they change; each hands the farm back with every desktop
    stopped, as a fresh farm has them.  A module that kills, restarts or reconfigures its farm, or that counts
    what runs on it, keeps a farm of its own (the default).
    """

    def __init__(self) -> None:
        self.farm: FarmProcess | None = None

    def take(self) -> FarmProcess:
        if self.farm is None:
            self.farm = FarmProcess()
            try:
                self.farm.up()
            except BaseException:
                self.close()
                raise
        return self.farm

    def hand_back(self) -> None:
        """Stop what the module left running; a farm that cannot is replaced, so the next module is unaffected."""
        farm = self.farm
        if farm is None:
            return
        try:
            rows: Any = farm.json("desktop", "list")
            busy = [r["name"] for r in rows if r["state"] not in ("stopped", "failed") or r["cmd"] is not None]
            if busy:
                farm.deckard("desktop", "stop", *busy, "--wait", "60", check=False)
            wait_for(lambda: not any(farm.guests(paths.lxc) for paths in farm.node_paths()), 60, 0.3, "no guest left")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        farm, self.farm = self.farm, None
        if farm is not None:
            farm.close()


class CloseSharedFarmAfterE2E:
    """Closes the shared farm when the test process starts a test outside tests/e2e.

    tests/conftest.py runs the end-to-end files before the integration and unit ones, so by then no module will
    ask for the farm again: it would otherwise idle through them and be stopped in the run's last seconds.  Should
    a module ask after all, ``SharedFarm.take`` brings a new farm up.  A plugin rather than a hook of this
    conftest: those are only called for the tests under tests/e2e.
    """

    def __init__(self, shared: SharedFarm) -> None:
        self.shared = shared

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if Path(__file__).parent not in item.path.parents:
            self.shared.close()


@pytest.fixture(scope="session")
def shared_farm(pytestconfig: pytest.Config) -> Iterator[SharedFarm]:
    shared = SharedFarm()
    closer = CloseSharedFarmAfterE2E(shared)
    pytestconfig.pluginmanager.register(closer)
    try:
        yield shared
    finally:
        pytestconfig.pluginmanager.unregister(closer)
        shared.close()


@pytest.fixture(scope="module")
def farm(request: pytest.FixtureRequest) -> Iterator[FarmProcess]:
    """A farm of the module's own, or with ``SHARED_FARM = True`` in the module, the test process's shared one."""
    reason = e2e_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if getattr(request.module, "SHARED_FARM", False):
        shared: SharedFarm = request.getfixturevalue("shared_farm")
        taken = shared.take()
        try:
            yield taken
        finally:
            shared.hand_back()
        return
    f = FarmProcess()
    try:
        f.up()
        yield f
    finally:
        f.close()


@pytest.fixture(scope="session")
def standard_image() -> Path:
    """The standard profile's image file (Xfce, Firefox ESR, ...), built once per session.

    Cached like every image: from a clean cache it costs the minimal rootfs plus the standard packages (about
    1.5 min), afterwards a second (the cached rootfs plus the agent).  A farm test registers it under a tag of
    its own and starts a desktop on that tag (the farm's default tag stays on the minimal image)::

        farm.deckard("image", "import", str(standard_image), "--tag", "standard")  # unpacked right away
        farm.deckard("desktop", "add", "web", "--user", "ada", "--tag", "standard")
    """
    reason = e2e_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from deckard.images.profile import load_profile

    return _built(load_profile("standard"))


@pytest.fixture(scope="session")
def minimal_image() -> Path:
    """The minimal profile's image file: what every farm's default OSF runs (a test imports it for another OSF)."""
    reason = e2e_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from deckard.images.profile import load_profile

    return _built(load_profile("minimal"))


def _built(profile: Any) -> Path:
    """``profile``'s image file for this agent, from the image cache (built once); images of older agents or
    recipes go (dead weight of 150-400 MB each)."""
    from deckard.images.builder import build_image

    out = image_cache() / "built"
    path = asyncio.run(build_image(out, cache_dir=image_cache(), progress=_quiet, profile=profile))
    kind = path.name.rsplit("-", 2)[0]  # deckard-<profile>[-vm]
    for old in out.glob(f"{kind}-*.tar.zst"):
        if old != path and old.name.rsplit("-", 2)[0] == kind:
            old.unlink(missing_ok=True)
    return path


def vm_unavailable_reason() -> str | None:
    reason = e2e_unavailable_reason()
    if reason:
        return reason
    for tool in ("qemu-system-x86_64", "qemu-img", "mkfs.vfat", "mcopy"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make test installs qemu-system-x86, qemu-utils, dosfstools, mtools)"
    return None


def _quiet(_text: str, _fraction: float) -> None:
    pass


@pytest.fixture(scope="session")
def vm_image() -> Path:
    """The minimal profile built with ``--format vm`` (kernel, pruned modules, static busybox), once per session
    from the image cache: the VM modules import it into an OSF with ``--driver vm``."""
    reason = vm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from deckard.images.profile import load_profile, with_vm

    return _built(with_vm(load_profile("minimal")))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium for a module's tests (each opens its own contexts)."""
    reason = browser_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
