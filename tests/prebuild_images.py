"""Build the desktop images the end-to-end tests use, before the tests ask (``make test`` runs it beside lint).

The first farm of a test run would otherwise build the ``minimal`` image (about 50 s from an empty cache) while
the other test worker waits on the cache's build lock, the first standard-image test would build ``standard``
(about 40 s more) and the VM module the minimal image's VM layer (``--format vm``, 15-30 s more).  Started in
the background as lint begins, the builds overlap work that had to be done anyway; a test that needs an image
before it is ready waits on the same lock as before.  Does nothing without root or LXC (the tests that need
images skip there).

Usage: ``.venv/bin/python tests/prebuild_images.py`` (prints one line per image).
"""

from __future__ import annotations

import asyncio
import sys
import time

from deckard.images.builder import build_image
from deckard.images.profile import Profile, load_profile, with_vm
from deckard.testing import e2e_unavailable_reason, image_cache


async def main() -> int:
    reason = e2e_unavailable_reason()
    if reason:
        print(f"prebuild: skipped ({reason})")
        return 0
    # the images of tests/e2e/conftest.py's fixtures, in the order the end-to-end modules first need them
    profiles: list[tuple[str, Profile]] = [
        ("minimal", load_profile("minimal")),
        ("minimal VM", with_vm(load_profile("minimal"))),  # the VM module starts first (tests/conftest.py)
        ("standard", load_profile("standard")),
    ]
    for name, profile in profiles:
        started = time.monotonic()
        path = await build_image(
            image_cache() / "built", cache_dir=image_cache(), progress=lambda _t, _f: None, profile=profile
        )
        print(f"prebuild: {name} image ready in {time.monotonic() - started:.0f} s: {path.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
