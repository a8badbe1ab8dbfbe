"""Egress throughput: a desktop downloading from an "upstream" network through its node, against the host.

Issue 11's target: a transfer from a desktop to the upstream namespace through the node (bridge, nftables filter
with the desktop's policy, masquerade) runs at ≥ 80 % of the same transfer from the host (same run).

Runs a real all-in-one farm (``FarmProcess``) and an ``Upstream`` namespace whose source server sends N bytes on
request; the same small Python client reads them on the host and inside a running desktop, ``--runs`` times
each, alternating.  The desktop's policy has a few rules before the one that matches, like a real tenant's.

Usage: ``.venv/bin/python bench/egress.py [--mib 1024] [--runs 5]`` (root; LXC).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys

from deckard.testing import FarmProcess, Upstream, wait_for

PORT = 9000
SOURCE = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('{ip}', {port})); s.listen()
buf = b'x' * (1 << 20)
while True:
    c, _ = s.accept()
    n = int(c.recv(32))
    view = memoryview(buf)
    while n > 0:
        c.sendall(view[: min(n, len(buf))]); n -= len(buf)
    c.close()
"""
CLIENT = (
    "import socket,time\n"
    "n={n}; s=socket.create_connection(('{ip}',{port})); t=time.perf_counter(); s.sendall(str(n).encode())\n"
    "buf=bytearray(1<<20); got=0\n"
    "while got<n:\n"
    "    k=s.recv_into(buf)\n"
    "    if not k: break\n"
    "    got+=k\n"
    "print(got/(time.perf_counter()-t)/1e6)\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    n = args.mib << 20
    upstream = Upstream().start()
    source = subprocess.Popen(
        ["ip", "netns", "exec", upstream.name, sys.executable, "-c", SOURCE.format(ip=upstream.ip, port=PORT)]
    )
    farm = FarmProcess(extra_env={"DECKARD_NETWORK__DNS_SERVERS": json.dumps([upstream.ip])})
    try:
        farm.up()
        farm.user_with_desktop("bench", "bench-Pa55word", "bench-desk")
        policy = "deny tcp any port 25; deny udp any port 123; deny 192.0.2.0/24; allow tcp any port 1-65535"
        farm.deckard("config", "set", "network.egress", policy)
        farm.deckard("desktop", "start", "bench-desk")
        desk = wait_for(lambda: (d := farm.desktop("bench-desk"))["state"] == "running" and d, 60, 0.2, "running")
        code = CLIENT.format(n=n, ip=upstream.ip, port=PORT)
        host, guest = [], []
        for _ in range(args.runs):
            host.append(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout))
            out = farm.attach(desk["id"], f'python3 -c "{code}"')  # type: ignore[index]
            guest.append(float(out.stdout))
        h, g = statistics.median(host), statistics.median(guest)
        print(f"machine: {platform.node()} {platform.machine()}, {args.runs} runs of {args.mib} MiB each")
        for label, value, runs in (("host → upstream", h, host), ("desktop → node (filter, NAT) → upstream", g, guest)):
            print(f"{label:42} median {value:8.0f} MB/s  (runs: {', '.join(f'{x:.0f}' for x in runs)})")
        print(f"ratio desktop/host: {g / h:.2f} (target ≥ 0.80)")
    finally:
        farm.close()
        source.kill()
        upstream.close()


if __name__ == "__main__":
    main()
