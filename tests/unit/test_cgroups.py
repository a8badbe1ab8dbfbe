"""drivers/cgroups.py on both cgroup layouts, on a directory tree shaped like each (the e2e tests read the real one).

A hybrid host (these build machines) has a hierarchy per v1 controller; a pure cgroup2 host (Debian 12 as installed)
has one hierarchy at the root with different file names.  What a desktop uses and is allowed reads the same on both.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deckard.drivers import cgroups
from deckard.drivers.cgroups import Limits, limits, memory_stat, memory_usage, remove_cgroups

GUEST = "lxc.payload.dk1"


def files(root: Path, tree: dict[str, str]) -> None:
    for name, text in tree.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def v1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    paths = {"memory": f"/{GUEST}", "cpu": f"/{GUEST}", "cpuacct": f"/{GUEST}", "pids": f"/{GUEST}", "unified": "/"}
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(cgroups, "_cgroup_paths", lambda _pid: paths)
    return tmp_path


@pytest.fixture
def v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(cgroups, "_cgroup_paths", lambda _pid: {"unified": f"/{GUEST}"})
    return tmp_path


def test_a_v1_guest_reads_its_controllers_hierarchies(v1: Path) -> None:
    files(
        v1,
        {
            f"memory/{GUEST}/memory.limit_in_bytes": "536870912\n",
            f"memory/{GUEST}/memory.usage_in_bytes": "41943040\n",
            f"memory/{GUEST}/memory.stat": "cache 1024\nrss 2048\ntotal_rss 4096\n",
            f"cpu/{GUEST}/cpu.cfs_quota_us": "150000\n",
            f"cpu/{GUEST}/cpu.cfs_period_us": "100000\n",
            f"pids/{GUEST}/pids.max": "2048\n",
        },
    )
    assert limits(7) == Limits(memory_bytes=512 << 20, cpu_quota_us=150_000, cpu_period_us=100_000, pids=2048)
    assert memory_usage(7) == 40 << 20
    assert memory_stat(7)["total_rss"] == 4096


def test_a_pure_cgroup2_guest_reads_the_one_hierarchy(v2: Path) -> None:
    files(
        v2,
        {
            f"{GUEST}/memory.max": "536870912\n",
            f"{GUEST}/memory.current": "41943040\n",
            f"{GUEST}/memory.stat": "anon 2048\nfile 1024\n",
            f"{GUEST}/cpu.max": "150000 100000\n",
            f"{GUEST}/pids.max": "2048\n",
        },
    )
    assert limits(7) == Limits(memory_bytes=512 << 20, cpu_quota_us=150_000, cpu_period_us=100_000, pids=2048)
    assert memory_usage(7) == 40 << 20
    assert memory_stat(7) == {"anon": 2048, "file": 1024}


def test_unlimited_and_missing_read_as_none(v1: Path) -> None:
    files(
        v1,
        {f"memory/{GUEST}/memory.limit_in_bytes": "9223372036854771712\n", f"cpu/{GUEST}/cpu.cfs_quota_us": "-1\n"},
    )
    assert limits(7) == Limits(memory_bytes=None, cpu_quota_us=None, cpu_period_us=None, pids=None)
    files(v1, {f"memory/{GUEST}/memory.usage_in_bytes": "garbage\n"})
    assert memory_usage(7) is None and memory_stat(7) == {}


def test_cgroup2_max_is_unlimited(v2: Path) -> None:
    files(v2, {f"{GUEST}/memory.max": "max\n", f"{GUEST}/cpu.max": "max 100000\n", f"{GUEST}/pids.max": "max\n"})
    assert limits(7) == Limits(memory_bytes=None, cpu_quota_us=None, cpu_period_us=100_000, pids=None)


def test_leftover_cgroups_are_removed_on_either_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crashed start leaves lxc.payload.<guest> (with children) and lxc.monitor.<guest>; other guests' stay."""
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(cgroups, "_cgroup_paths", lambda _pid: {"unified": "/system.slice/deckard.service"})
    own = "system.slice/deckard.service"
    left = ("lxc.payload.dk1/init", "lxc.monitor.dk1", f"{own}/lxc.payload.dk1", "lxc.payload.dk2")
    for d in left:
        (tmp_path / d).mkdir(parents=True)
    remove_cgroups("dk1")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "lxc.payload.dk2",
        "system.slice",
        "system.slice/deckard.service",
    ]

    hybrid = tmp_path / "hybrid"
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", hybrid)
    monkeypatch.setattr(cgroups, "_cgroup_paths", lambda _pid: {"memory": "/", "pids": "/user.slice", "unified": "/"})
    for d in ("memory/lxc.payload.dk1/init", "pids/user.slice/lxc.payload.dk1", "pids/lxc.payload.dk2", "unified"):
        (hybrid / d).mkdir(parents=True)
    remove_cgroups("dk1")
    assert sorted(str(p.relative_to(hybrid)) for p in hybrid.rglob("*")) == [
        "memory",
        "pids",
        "pids/lxc.payload.dk2",
        "pids/user.slice",
        "unified",
    ]
