"""End-to-end fixtures: a real all-in-one farm (LXC desktops) started through the CLI as a user would."""

from __future__ import annotations

import asyncio
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
)


@pytest.fixture(scope="module")
def farm() -> Iterator[FarmProcess]:
    reason = e2e_unavailable_reason()
    if reason:
        pytest.skip(reason)
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
    from deckard.images.builder import build_image
    from deckard.images.profile import load_profile

    out = image_cache() / "built"
    path = asyncio.run(
        build_image(out, cache_dir=image_cache(), progress=lambda _t, _f: None, profile=load_profile("standard"))
    )
    for old in out.glob("deckard-standard-*.tar.zst"):  # images of older agents are dead weight (300 MB each)
        if old != path:
            old.unlink(missing_ok=True)
    return path


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
