"""Test and benchmark helpers shipped with the package: run a real all-in-one farm in a subprocess.

``FarmProcess`` starts ``deckard up`` with its own home, ports, bridge and desktop network, so tests and
benchmarks never collide with a farm already on the machine, and ``close()`` removes every container, bridge
and file the farm made, even after a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_cache() -> Path:
    return Path(os.environ.get("DECKARD_IMAGE_CACHE", REPO / ".cache" / "images"))


def e2e_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run LXC containers"
    if not shutil.which("lxc-start"):
        return "LXC is not installed (apt-get install lxc; `make test` does it)"
    if not shutil.which("debootstrap"):
        return "debootstrap is not installed (`make test` installs it)"
    return None


@dataclass
class FarmProcess:
    """A farm under a temporary home, driven through its own CLI like a user would."""

    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="deckard-farm-")))
    api_port: int = field(default_factory=free_port)
    broker_port: int = field(default_factory=free_port)
    bridge: str = field(default_factory=lambda: f"dke{os.getpid() % 100000}")
    network: str = field(default_factory=lambda: f"10.214.{os.getpid() % 250}.0/24")
    extra_env: dict[str, str] = field(default_factory=dict)
    up_output: str = ""

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "DECKARD_HOME": str(self.home),
                "DECKARD_PROFILE": str(self.home / "cli-profile.json"),
                "DECKARD_IMAGE_CACHE": str(image_cache()),
                "DECKARD_CA": str(self.home / "tls" / "ca.pem"),
                "NO_COLOR": "1",
                "COLUMNS": "200",
            }
        )
        env.update(self.extra_env)
        return env

    @property
    def ca(self) -> Path:
        return self.home / "tls" / "ca.pem"

    @property
    def broker(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def sqlite_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.home / 'deckard.db'}"

    def deckard(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "deckard.cli.main", *args],
            env=self.env,
            text=True,
            capture_output=True,
            input=input,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"deckard {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def up(self) -> str:
        proc = self.deckard(
            "up",
            "--home",
            str(self.home),
            "--api-port",
            str(self.api_port),
            "--broker-port",
            str(self.broker_port),
            "--listen",
            "127.0.0.1",
            "--bridge",
            self.bridge,
            "--network",
            self.network,
            "--node-name",
            f"node-{self.home.name}",
        )
        self.up_output = proc.stdout + proc.stderr
        return self.up_output

    def pid(self) -> int | None:
        try:
            return int((self.home / "run" / "deckard-up.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def json(self, *args: str) -> object:
        return json.loads(self.deckard(*args, "--json").stdout)

    def guests(self) -> list[str]:
        lxc = self.home / "run" / "lxc"
        if not lxc.exists():
            return []
        out = subprocess.run(["lxc-ls", "-P", str(lxc), "-1"], capture_output=True, text=True)
        return [n for n in out.stdout.split() if n]

    def attach(self, desktop_id: int, command: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside a desktop (root, or as ``user``) with lxc-attach."""
        from deckard.runtime.paths import FarmPaths

        name = FarmPaths(self.home).guest_name(desktop_id)
        cmd = ["lxc-attach", "-n", name, "-P", str(self.home / "run" / "lxc"), "--clear-env", "--"]
        cmd += ["su", "-", user, "-c", command] if user else ["sh", "-c", command]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)

    def close(self) -> None:
        """Stop the farm and remove everything it made, whatever state it is in."""
        try:
            self.deckard("down", "--home", str(self.home), "--timeout", "30", check=False, timeout=60)
        except subprocess.TimeoutExpired:
            pass
        pid = self.pid()
        if pid:
            try:
                os.killpg(pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
        lxc = self.home / "run" / "lxc"
        for name in self.guests():
            subprocess.run(["lxc-stop", "-k", "-n", name, "-P", str(lxc)], capture_output=True)
        import asyncio

        from deckard.drivers.container import remove_cgroups
        from deckard.drivers.network import remove_bridge

        for name in self.guests():
            remove_cgroups(name)
        asyncio.run(remove_bridge(self.bridge))
        shutil.rmtree(self.home, ignore_errors=True)


def wait_for(predicate: object, timeout: float, interval: float = 0.1, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()  # type: ignore[operator]
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
