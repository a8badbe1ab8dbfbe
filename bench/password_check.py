"""One local password check (argon2id, ``auth/local.py``) in a server's process: time, CPU and page faults.

The broker's process maps every big allocation afresh (``broker/server.bound_the_heap``), so argon2's 19 MiB came
from fresh pages at each check; a server now checks in memory it keeps (``local.warm`` at its start).  Each variant
runs in a process of its own with the broker's heap settings: checks in kept memory, and with no arena (argon2's
own malloc, as before).  Prints each variant's median wall time, CPU time (user + system) and minor page faults
per check.

Usage: ``.venv/bin/python bench/password_check.py [--checks 30]`` (no root).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

CHILD = """
import json, resource, statistics, sys, time
from deckard.auth import local
from deckard.broker.server import bound_the_heap
assert bound_the_heap()
if sys.argv[1] == "argon2's own memory":
    local._ARENAS.count = 0
h = local.hash_password("correct horse battery staple")
local.warm()
rows = []
for i in range(int(sys.argv[2])):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    assert local.verify_password(h, "correct horse battery staple")
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    rows.append((t1 - t0, cpu, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
med = lambda i: statistics.median(r[i] for r in rows)
print(json.dumps({"wall_ms": round(med(0) * 1000, 1), "cpu_ms": round(med(1) * 1000, 1),
                  "system_ms": round(med(2) * 1000, 1), "page_faults": int(med(3))}))
"""

VARIANTS = ("kept memory", "argon2's own memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checks", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, object] = {"machine": f"{platform.node()} {platform.machine()} cpus={os.cpu_count()}"}
    for variant in VARIANTS:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, variant, str(args.checks)], capture_output=True, text=True, check=True
        )
        results[variant] = json.loads(out.stdout)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"machine: {results['machine']}  checks: {args.checks} per variant (medians)")
    for variant in VARIANTS:
        r = results[variant]
        assert isinstance(r, dict)
        print(
            f"{variant:>20}: {r['wall_ms']} ms a check, CPU {r['cpu_ms']} ms (system {r['system_ms']} ms), "
            f"{r['page_faults']} page faults"
        )


if __name__ == "__main__":
    main()
