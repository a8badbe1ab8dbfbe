"""End-to-end fixtures: a real all-in-one farm (LXC desktops) started through the CLI as a user would."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deckard.testing import FarmProcess, e2e_unavailable_reason


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
