"""Live figures of this machine for the heartbeat: free memory, CPUs, load (QVD sampled them once; we don't)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class HostFigures:
    cpus: float
    mem_total_mib: int
    mem_free_mib: int
    load: float


def read_host_figures() -> HostFigures:
    mem: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            mem[key] = int(rest.split()[0])  # kB
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    return HostFigures(
        cpus=float(os.cpu_count() or 1),
        mem_total_mib=mem.get("MemTotal", 0) // 1024,
        mem_free_mib=mem.get("MemAvailable", mem.get("MemFree", 0)) // 1024,
        load=load,
    )
