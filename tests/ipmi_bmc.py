"""A simulated BMC per test "machine": OpenIPMI's ``ipmi_sim`` on a loopback UDP port, whose chassis power is the
life of a process group.

``ipmi_sim`` answers IPMI 1.5/2.0 over LAN (``ipmitool -I lanplus``, so ``fence_ipmilan``) with the user and
password of its ``lan.conf``; its chassis power goes through a ``chassis_control`` program it runs as
``PROG get power`` (we answer ``power:1`` while a process of the machine's group lives) and ``PROG set power 0``
(we SIGKILL the whole group: a power cut, not a shutdown).  The machine's group is whatever process group the
test puts there (``Bmc.machine(pgid)``), e.g. a real ``deckard node`` started with ``start_new_session``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from deckard.runtime.bmc import EMU, LAN_CONF

USER, PASSWORD = "fencer", "bmc-s3cret"

CHASSIS = '''#!{python}
"""Chassis control of a simulated machine (ipmi_sim's chassis_control): its power is process group {pgid_file}."""
import os, signal, sys, time

def members(pgid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{{entry}}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid and stat[0] not in ("Z", "X"):
                out.append(int(entry))
    return out

try:
    pgid = int(open({pgid_file!r}).read())
except (OSError, ValueError):
    pgid = 0
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
if args[:1] == ["get"]:
    print("power:%d" % (1 if pgid and members(pgid) else 0))
elif args[:2] == ["set", "power"] and args[2:] == ["0"] and pgid:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 5
    while members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
'''


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Bmc:
    """One machine's BMC: ``with Bmc(tmp, "m2") as bmc: bmc.machine(pgid)``; ``bmc.port``, ``bmc.options()``."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.dir = workdir / f"bmc-{name}"
        self.name = name
        self.port = free_udp_port()
        self.pgid_file = self.dir / "machine.pgid"
        self.log = self.dir / "chassis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def options(self, **extra: str) -> dict[str, str]:
        """What ``fence_ipmilan`` needs to reach this BMC: cipher suite 3 (no slow cipher-suite discovery) and no
        pause after the power-off (power_wait, 2 s by default: a real machine's BMC may want it)."""
        return {
            "ip": "127.0.0.1",
            "ipport": str(self.port),
            "username": USER,
            "lanplus": "1",
            "cipher": "3",
            "power_wait": "0",
            **extra,
        }

    def machine(self, pgid: int) -> None:
        """The process group this BMC powers off."""
        self.pgid_file.write_text(str(pgid))

    def power_calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def __enter__(self) -> Bmc:
        (self.dir / "state").mkdir(parents=True)
        chassis = self.dir / "chassis"
        chassis.write_text(CHASSIS.format(python=sys.executable, pgid_file=str(self.pgid_file), log=str(self.log)))
        chassis.chmod(0o755)
        conf = self.dir / "lan.conf"
        conf.write_text(
            LAN_CONF.format(
                name=self.name,
                address="127.0.0.1",
                port=self.port,
                auths="none md2 md5 straight",
                guid="a123456789abcdefa123456789abcdef",
                chassis=chassis,
                user=USER,
                password=PASSWORD,
            )
        )
        emu = self.dir / "machine.emu"
        emu.write_text(EMU)
        self.proc = subprocess.Popen(
            ["ipmi_sim", "-c", str(conf), "-f", str(emu), "-s", str(self.dir / "state"), "-n"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "ipmi_sim.log", "wb"),
            start_new_session=True,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        cmd = ["ipmitool", "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(self.port)]
        cmd += ["-U", USER, "-E", "-N", "1", "-R", "1", "mc", "info"]
        deadline = time.monotonic() + 10
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"ipmi_sim exited {self.proc.returncode}: {(self.dir / 'ipmi_sim.log').read_text()}")
            env = {**os.environ, "IPMI_PASSWORD": PASSWORD}
            if subprocess.run(cmd, env=env, capture_output=True, timeout=10).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"ipmi_sim on port {self.port} did not answer")
            time.sleep(0.1)

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
