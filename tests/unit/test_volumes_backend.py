"""The qcow2 volume backend against real ``qemu-img``: a full storage root is ``storage_full`` and a failed
create or clone leaves no file behind; a shrink is ``bad_size``."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deckard.drivers.volumes import Qcow2Backend, mount_on_host, unmount_from_host
from deckard.model.errors import BadInput, DeckardError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


@pytest.fixture
def tiny_storage(tmp_path: Path) -> Iterator[Path]:
    """A storage root with 128 KiB of room: less than a qcow2 file's first clusters."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    root = tmp_path / "storage"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


async def test_a_full_storage_root_is_storage_full_and_leaves_no_file(tiny_storage: Path) -> None:
    backend = Qcow2Backend(tiny_storage)
    (tiny_storage / "filler").write_bytes(b"\0" * (100 << 10))
    with pytest.raises(DeckardError) as e:
        await backend.create(1, 7, 1)
    assert e.value.code == "storage_full", e.value
    assert [p.name for p in (tiny_storage / "volumes" / "1").iterdir()] == []


async def test_a_clone_of_a_missing_snapshot_leaves_no_file(tmp_path: Path) -> None:
    backend = Qcow2Backend(tmp_path)
    await backend.create(1, 1, 1)
    with pytest.raises(DeckardError) as e:
        await backend.clone(1, 1, "nosuch", 1, 2)
    assert e.value.code == "volume_failed"
    assert sorted(p.name for p in (tmp_path / "volumes" / "1").iterdir()) == ["vol-1.qcow2"]


async def test_a_volume_only_grows(tmp_path: Path) -> None:
    backend = Qcow2Backend(tmp_path)
    await backend.create(1, 1, 2)
    with pytest.raises(BadInput) as e:
        await backend.resize(1, 1, 1)
    assert e.value.code == "bad_size"
    await backend.resize(1, 1, 3)
    assert await backend.virtual_size_gib(backend.path(1, 1)) == 3


def _loop_devices() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


def _root_only() -> None:
    if os.geteuid() != 0 or shutil.which("qemu-storage-daemon") is None or not Path("/dev/fuse").exists():
        pytest.skip("mounting a volume on the host needs root, qemu-storage-daemon and FUSE")


async def test_a_volume_is_mounted_on_the_host_formatted_once_and_unmounted_without_a_trace(tmp_path: Path) -> None:
    """What a container desktop gets: the qcow2 exported (FUSE), looped, made ext4 on first use, mounted."""
    _root_only()
    backend = Qcow2Backend(tmp_path)
    await backend.create(1, 1, 1)
    work = tmp_path / "run" / "vol-1"
    mnt = await mount_on_host(backend.path(1, 1), work, read_only=False, label="data")
    try:
        assert os.path.ismount(mnt) and (mnt / "lost+found").is_dir()
        (mnt / "f").write_text("kept")
        # QEMU's lock: nobody else may write it meanwhile, neither a second mount nor a snapshot
        with pytest.raises(DeckardError) as e:
            await mount_on_host(backend.path(1, 1), tmp_path / "run" / "again", read_only=False, label="data")
        assert e.value.code == "volume_busy"
        assert not (tmp_path / "run" / "again").exists()
        with pytest.raises(DeckardError) as e:
            await backend.snapshot(1, 1, "s1")
        assert e.value.code == "volume_busy"
    finally:
        await unmount_from_host(work)
    assert not work.exists()
    mnt = await mount_on_host(backend.path(1, 1), work, read_only=True, label="data")
    try:
        assert (mnt / "f").read_text() == "kept"  # formatted once: the second mount keeps the data
        with pytest.raises(OSError):
            (mnt / "g").write_text("no")
    finally:
        await unmount_from_host(work)
    assert not work.exists() and str(work) not in _loop_devices()


async def test_an_unformatted_volume_is_not_mounted_read_only(tmp_path: Path) -> None:
    _root_only()
    backend = Qcow2Backend(tmp_path)
    await backend.create(1, 2, 1)
    work = tmp_path / "run" / "vol-2"
    with pytest.raises(DeckardError) as e:
        await mount_on_host(backend.path(1, 2), work, read_only=True, label="empty")
    assert e.value.code == "volume_unformatted"
    assert not work.exists()
