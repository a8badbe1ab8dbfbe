"""Home I/O on a GlusterFS replica-3 storage root against a local directory, and what losing a storage machine costs.

Three storage machines in namespaces on this box (``deckard.testing_storage``: each its own glusterd, brick and
address on a bridge), the volume made and mounted by ``deckard storage gluster create|mount`` as a node would,
then in the same run on the volume and on a local directory of the same disk:

* sequential write (1 MiB blocks, fsync at the end) and read (the client's page cache dropped first), MB/s;
* small-file creates/s (4 KiB files written and closed, as a desktop session fills a home);
* fsync latency of a 4 KiB append (p50 / p99), what an editor or a mail client waits for at every save;
* unpacking a tree of many small files (``tar``, as a node unpacks an image into ``basefs/``);

and a desktop's start with its home on the volume against a farm on local storage (``--starts``: a real
all-in-one farm with LXC desktops each, connect request → first RFB byte, for a new home and then for a stopped
desktop), and then: the longest stall a busy writer sees when one storage machine loses power (its link first,
then its processes), or only its gluster processes crash (the kernel resets the connections), and how long the
returning machine takes to heal.

Usage: ``.venv/bin/python bench/storage_gluster.py [--mib 256] [--files 2000] [--starts 5]`` (root;
glusterfs-server and glusterfs-client installed; ``--starts`` also LXC).  The three "machines" share this box's
disk and CPUs, so the figures are GlusterFS's protocol and FUSE cost, not a network's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import time_to_desktop as ttd
from deckard.drivers.gluster import GlusterCli
from deckard.testing import FarmProcess
from deckard.testing_storage import GlusterMachines, gluster_unavailable_reason

DECKARD = [sys.executable, "-m", "deckard.cli.main"]
BLOCK = 1 << 20


def run(prefix: list[str], *args: str) -> None:
    done = subprocess.run([*prefix, *DECKARD, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"deckard {' '.join(args[:3])} failed: {done.stderr}")


def sequential(directory: Path, mib: int) -> tuple[float, float]:
    path = directory / "seq.bin"
    block = os.urandom(BLOCK)
    t0 = time.perf_counter()
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = mib / (time.perf_counter() - t0)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the client's page cache, not the servers'
    t0 = time.perf_counter()
    while os.read(fd, BLOCK):
        pass
    read = mib / (time.perf_counter() - t0)
    os.close(fd)
    path.unlink()
    return write, read


def small_files(directory: Path, count: int) -> float:
    target = directory / "small"
    target.mkdir()
    data = b"x" * 4096
    t0 = time.perf_counter()
    for i in range(count):
        with (target / f"f{i}").open("wb") as f:
            f.write(data)
    rate = count / (time.perf_counter() - t0)
    shutil.rmtree(target)
    return rate


def fsync_latency(directory: Path, count: int = 200) -> tuple[float, float]:
    times = []
    with (directory / "journal").open("ab") as f:
        for _ in range(count):
            t0 = time.perf_counter()
            f.write(b"y" * 4096)
            f.flush()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - t0)
    (directory / "journal").unlink()
    times.sort()
    return statistics.median(times) * 1000, times[int(len(times) * 0.99) - 1] * 1000


def unpack(directory: Path, tarball: Path) -> float:
    target = directory / "basefs"
    target.mkdir()
    t0 = time.perf_counter()
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(target)], check=True)
    seconds = time.perf_counter() - t0
    shutil.rmtree(target)
    return seconds


def make_tree(tarball: Path, files: int) -> None:
    """A tarball like an image's tree: many small files in nested directories (``/usr/share`` sized 1-16 KiB)."""
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(files):
            d = Path(tmp) / f"d{i % 40}" / f"e{i % 7}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}").write_bytes(b"z" * (1024 * (1 + i % 16)))
        with tarfile.open(tarball, "w") as tar:
            tar.add(tmp, arcname=".")


def measure(directory: Path, mib: int, files: int, tarball: Path) -> dict[str, float]:
    directory.mkdir(parents=True, exist_ok=True)
    write, read = sequential(directory, mib)
    p50, p99 = fsync_latency(directory)
    return {
        "write": write,
        "read": read,
        "creates": small_files(directory, files),
        "fsync_p50": p50,
        "fsync_p99": p99,
        "unpack": unpack(directory, tarball),
    }


def worst_stall(directory: Path, fault: object, seconds: float = 14.0) -> float:
    """A writer appending and fsyncing 4 KiB in a loop; ``fault`` (a callable) after 1 s; the longest one write."""
    assert callable(fault)
    worst = 0.0
    stop = time.monotonic() + seconds
    timer = threading.Timer(1.0, fault)
    timer.start()
    with (directory / "busy").open("ab") as f:
        while time.monotonic() < stop:
            t0 = time.monotonic()
            f.write(b"w" * 4096)
            f.flush()
            os.fsync(f.fileno())
            worst = max(worst, time.monotonic() - t0)
    timer.join()
    return worst


async def heal_seconds(cli: GlusterCli, node: str, timeout: float = 120.0) -> float:
    """Until the volume could lose a machine again: healed, and the node's client connected to every brick."""
    t0 = time.monotonic()
    while not await cli.redundant("deckard", node):
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"the volume was not redundant again within {timeout:.0f} s")
        await asyncio.sleep(0.2)
    return time.monotonic() - t0


def desktop_starts(farm: FarmProcess, runs: int) -> tuple[float, float, float]:
    """(first start with a new home, median and max of ``runs`` starts of the stopped desktop), seconds."""
    desk = farm.user_with_desktop("bench", ttd.PASSWORD, "bench-desk")
    first = asyncio.run(ttd.first_byte(farm, "bench", desk["id"]))
    again = ttd.cold_starts(farm, "bench-desk", desk["id"], runs)["time_to_desktop_s"]
    assert isinstance(again, dict)
    return first, again["median"], again["max"]


def farm_on(machines: GlusterMachines | None, runs: int) -> tuple[float, float, float]:
    """A real all-in-one farm, its storage root on the volume (``machines``) or a local directory."""
    farm = FarmProcess(extra_env={"DECKARD_STORAGE__LOCAL_LAYERS": "1"} if machines else {})
    try:
        if machines is not None:
            machines.mounted(farm.home / "storage")
            servers = ",".join(machines.address(i) for i in (1, 2, 3))
            run(machines.on_node(), "storage", "gluster", "mount", "--server", servers, "--home", str(farm.home))
        farm.up()
        return desktop_starts(farm, runs)
    finally:
        farm.close()


def main(mib: int, files: int, tree: int, starts: int) -> None:
    reason = gluster_unavailable_reason()
    if reason:
        raise SystemExit(reason)
    scratch = Path(tempfile.mkdtemp(prefix="deckard-bench-gluster-", dir="/var/tmp"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, scratch, True)
        machines = cleanup.enter_context(GlusterMachines(scratch / "machines"))
        bricks = [arg for i in (1, 2, 3) for arg in ("--brick", machines.brick(i))]
        t0 = time.monotonic()
        run(machines.on_machine(1), "storage", "gluster", "create", *bricks, "--force")
        created = time.monotonic() - t0
        home = scratch / "farm"
        machines.mounted(home / "storage")
        servers = ",".join(machines.address(i) for i in (1, 2, 3))
        t0 = time.monotonic()
        run(machines.on_node(), "storage", "gluster", "mount", "--server", servers, "--home", str(home))
        mounted = time.monotonic() - t0
        tarball = scratch / "tree.tar"
        make_tree(tarball, tree)
        gl = measure(home / "storage/homes/bench", mib, files, tarball)
        lo = measure(scratch / "local/homes/bench", mib, files, tarball)

        start_gl = farm_on(machines, starts) if starts else None
        start_lo = farm_on(None, starts) if starts else None

        cli = GlusterCli(machines.gluster(1))
        homes = home / "storage/homes/bench"
        crash = worst_stall(homes, lambda: machines.crash(2))
        machines.power_on(2)
        heal_crash = asyncio.run(heal_seconds(cli, machines.node_address))
        power = worst_stall(homes, lambda: machines.power_off(3))
        machines.power_on(3)
        heal_power = asyncio.run(heal_seconds(cli, machines.node_address))

    print(f"# storage_gluster  {time.strftime('%Y-%m-%d')}  {platform.node()}  {os.cpu_count()} CPUs")
    print(f"volume create (3 glusterd, peer probe, create, options, start) {created:.1f} s; mount {mounted:.2f} s")
    print(f"{'figure':<44}{'gluster':>12}{'local':>12}{'ratio':>8}")
    rows = [
        (f"sequential write {mib} MiB (MB/s)", "write", "{:.0f}"),
        (f"sequential read {mib} MiB (MB/s)", "read", "{:.0f}"),
        ("small-file creates, 4 KiB (/s)", "creates", "{:.0f}"),
        ("fsync of a 4 KiB append, p50 (ms)", "fsync_p50", "{:.2f}"),
        ("fsync of a 4 KiB append, p99 (ms)", "fsync_p99", "{:.2f}"),
        (f"unpack a tree of {tree} files (s)", "unpack", "{:.2f}"),
    ]
    for label, key, fmt in rows:
        print(f"{label:<44}{fmt.format(gl[key]):>12}{fmt.format(lo[key]):>12}{gl[key] / lo[key]:>8.2f}")
    if start_gl and start_lo:
        for label, k in (("desktop start, new home (s)", 0), (f"desktop start, median of {starts} (s)", 1)):
            print(f"{label:<44}{start_gl[k]:>12.3f}{start_lo[k]:>12.3f}{start_gl[k] / start_lo[k]:>8.2f}")
        print(f"{'desktop start, max (s)':<44}{start_gl[2]:>12.3f}{start_lo[2]:>12.3f}")
    print(f"busy writer, machine 2's gluster processes killed: longest write {crash:.2f} s; healed {heal_crash:.1f} s")
    print(
        f"busy writer, machine 3 powered off (link, then all): longest write {power:.2f} s; healed {heal_power:.1f} s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--tree", type=int, default=5000)
    parser.add_argument("--starts", type=int, default=5, help="desktop starts per farm (0: no farms)")
    args = parser.parse_args()
    main(args.mib, args.files, args.tree, args.starts)
