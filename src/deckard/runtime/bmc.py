"""A simulated BMC for each machine of a demo farm (``deckard up --machines N``), so that a lost machine is fenced
through IPMI as a real one would be (``fence_ipmilan`` → the machine's BMC → power off).

Each BMC is OpenIPMI's ``ipmi_sim`` (Debian package ``openipmi``) listening on the host's underlay address — the
management network a real farm's BMCs sit on — with a user and password of its own.  Its chassis power is the
machine (runtime/machines.py): ipmi_sim asks ``python -m deckard.runtime.bmc chassis ADDRESS get power`` (on while
a process of the machine lives) and ``… set power 0`` (every process of the machine killed at once, its network
gone: ``Machine.power_off``).  The machine's node registers the BMC as its fence agent (``deckard node
--fence-agent fence_ipmilan --fence-option ip=… --fence-password-file …``), so the node that declares it lost
fences it through IPMI.  Without ipmi_sim or fence_ipmilan the demo keeps its power-switch hook.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

USER = "deckard"
BASE_PORT = 6230  # machine i's BMC answers on BASE_PORT + i (UDP) of the host's underlay address

# ipmi_sim's configuration for one BMC: ``auths`` are the IPMI 1.5 authentication types it accepts,
# ``chassis`` the program it runs for chassis control (``PROG get power`` / ``PROG set power 0``)
LAN_CONF = """name "{name}"
set_working_mc 0x20
  startlan 1
    addr {address} {port}
    priv_limit admin
    allowed_auths_callback {auths}
    allowed_auths_user {auths}
    allowed_auths_operator {auths}
    allowed_auths_admin {auths}
    guid {guid}
  endlan
  chassis_control "{chassis}"
  user 2 true "{user}" "{password}" admin 10 {auths}
"""
EMU = "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n"

# where Debian's fence-agents installs its programs, for a daemon whose PATH lacks /usr/sbin
AGENT_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_agent(agent: str) -> str | None:
    """The fence agent program ``agent`` (``fence_ipmilan`` …) on this machine."""
    return shutil.which(agent) or next((p for d in AGENT_DIRS if os.access(p := f"{d}/{agent}", os.X_OK)), None)


def bmc_missing_reason() -> str | None:
    """Why BMCs cannot be simulated and fenced here (ipmi_sim, ipmitool, fence_ipmilan), or None."""
    for tool, package in (("ipmi_sim", "openipmi"), ("ipmitool", "ipmitool")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package}; `make deps` does it)"
    if find_agent("fence_ipmilan") is None:
        return "fence_ipmilan is not installed (apt-get install fence-agents; `make deps` does it)"
    return None


def bmc_available() -> bool:
    """ipmi_sim to simulate the BMCs and fence_ipmilan (with ipmitool) to fence through them."""
    return bmc_missing_reason() is None


@dataclass(frozen=True)
class Bmc:
    """A started BMC: where ``fence_ipmilan`` reaches it and the file holding its password."""

    pid: int
    address: str
    port: int
    password_file: Path

    def fence_args(self) -> list[str]:
        """``deckard node`` flags that register this BMC as the node's fence agent (the password stays in a file)."""
        options = {"ip": self.address, "ipport": str(self.port), "username": USER, "lanplus": "1", "cipher": "3"}
        args = ["--fence-agent", "fence_ipmilan", "--fence-password-file", str(self.password_file)]
        for key, value in options.items():
            args += ["--fence-option", f"{key}={value}"]
        return args


def start_bmc(directory: Path, name: str, address: str, port: int, machine_address: str) -> Bmc:
    """Run the BMC of the machine at ``machine_address`` on ``address``:``port``; its files go in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state").mkdir(exist_ok=True)
    password = secrets.token_urlsafe(12)
    password_file = directory / "password"
    password_file.touch(mode=0o600)
    password_file.write_text(password + "\n")
    conf = directory / "lan.conf"
    conf.write_text(
        LAN_CONF.format(
            name=name,
            address=address,
            port=port,
            auths="md5",
            guid=secrets.token_hex(16),
            chassis=f"{sys.executable} -m deckard.runtime.bmc chassis {machine_address}",
            user=USER,
            password=password,
        )
    )
    conf.chmod(0o600)
    (directory / "machine.emu").write_text(EMU)
    with open(directory / "ipmi_sim.log", "ab") as log:
        proc = subprocess.Popen(
            ["ipmi_sim", "-c", str(conf), "-f", str(directory / "machine.emu"), "-s", str(directory / "state"), "-n"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    (directory / "pid").write_text(str(proc.pid))
    time.sleep(0.2)
    if proc.poll() is not None:
        raise RuntimeError(f"ipmi_sim for {name} exited {proc.returncode}: see {directory / 'ipmi_sim.log'}")
    return Bmc(proc.pid, address, port, password_file)


def stop_bmcs(root: Path) -> None:
    """Stop every BMC started under ``root`` and remove their files."""
    for pid_file in sorted(root.glob("*/pid")):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except (ValueError, ProcessLookupError, PermissionError):
            pass
    shutil.rmtree(root, ignore_errors=True)


def chassis(machine_address: str, args: list[str]) -> int:
    """ipmi_sim's chassis control: ``get power`` prints ``power:1`` while the machine runs; ``set power 0`` pulls
    its plug.  Power on is not simulated (a demo machine is made by ``deckard up``)."""
    from deckard.runtime.machines import machine_at

    machine = machine_at(machine_address)
    if args[:1] == ["get"]:
        print(f"power:{1 if machine is not None and machine.processes() else 0}")
        return 0
    if args[:2] == ["set", "power"] and args[2:] == ["0"] and machine is not None:
        machine.power_off()
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "chassis":
        print("usage: python -m deckard.runtime.bmc chassis MACHINE_ADDRESS get power | set power 0")
        sys.exit(2)
    sys.exit(chassis(sys.argv[2], sys.argv[3:]))
