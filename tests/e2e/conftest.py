"""End-to-end fixtures: a real all-in-one farm (LXC desktops) started through the CLI as a user would."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from deckard.testing import CHROMIUM, CHROMIUM_ARGS, FarmProcess, browser_unavailable_reason, e2e_unavailable_reason


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
