"""The farm's own files on the host: other local users may walk through the farm home, never read its secrets."""

from __future__ import annotations

import stat
from pathlib import Path

from deckard.db.engine import Database
from deckard.runtime.paths import FarmPaths


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_farm_home_is_traversable_but_keys_logs_and_the_database_are_private(tmp_path: Path) -> None:
    paths = FarmPaths(tmp_path / "farm")
    paths.make()
    assert _mode(paths.home) == 0o711, "desktops' unprivileged root must reach the storage, nobody may list it"
    assert _mode(paths.tls) == _mode(paths.logs) == _mode(paths.import_dir) == 0o700
    db = Database(f"sqlite+aiosqlite:///{paths.sqlite_path}")
    await db.start()
    try:
        assert _mode(paths.sqlite_path) == 0o600, "password hashes and agent tokens are the owner's alone"
    finally:
        await db.close()
