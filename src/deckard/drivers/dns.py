"""The desktops' DNS resolver: a dnsmasq on the node's bridge address forwarding to the node's own resolvers.

Why dnsmasq: a small, well-kept caching forwarder that Debian ships without a service (``dnsmasq-base``); the
node daemon runs it as a child, unprivileged after binding, listening only on the gateway address of the
bridge, with no DHCP and no host files.  Upstream servers are the node's ``network.dns_servers`` setting, or
else the node's own ``/etc/resolv.conf``, re-read when it changes.

A stale resolver (the daemon was killed) is found by its pid file and replaced.  Nodes of one machine that share a
bridge (a demo farm) share one resolver: the first binds the address, the others find it taken and leave it be.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from deckard.model.errors import DriverError

log = structlog.get_logger()

SHARED_RECHECK_S = 30.0


class Resolver:
    def __init__(self, bridge: str, address: str, run_dir: Path, upstream: Sequence[str] = ()) -> None:
        self.bridge = bridge
        self.address = address
        self.upstream = tuple(upstream)
        self.pid_file = run_dir / f"dnsmasq-{bridge}.pid"
        self.log_file = run_dir / f"dnsmasq-{bridge}.log"
        self._proc: asyncio.subprocess.Process | None = None
        self._shared_at: float | None = None  # when we last found another node's resolver on the address

    def command(self) -> list[str]:
        binary = shutil.which("dnsmasq")
        if binary is None:
            raise DriverError(
                "dnsmasq is not installed: desktops would have no DNS; install the dnsmasq-base package",
                code="resolver_unavailable",
            )
        args = [
            binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            f"--pid-file={self.pid_file}",
            f"--listen-address={self.address}",
            "--bind-interfaces",
            "--except-interface=lo",
            "--no-hosts",
            "--cache-size=1000",
            "--user=nobody",
            "--group=nogroup",
            "--log-facility=-",
            "--quiet-dhcp",
        ]
        if self.upstream:
            args += ["--no-resolv", *(f"--server={s}" for s in self.upstream)]
        else:
            args.append("--resolv-file=/etc/resolv.conf")
        return args

    def _kill_stale(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_file.read_text().strip())
            if Path(f"/proc/{pid}/comm").read_text().strip() == "dnsmasq":
                os.kill(pid, signal.SIGTERM)
        self.pid_file.unlink(missing_ok=True)

    async def start(self) -> None:
        await asyncio.to_thread(self._kill_stale)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(), stdin=asyncio.subprocess.DEVNULL, stdout=log_fd, stderr=log_fd
            )
        finally:
            os.close(log_fd)
        # dnsmasq binds before it settles: an early exit is a bind failure (address in use, no bridge)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), 0.3)
        if self._proc.returncode is not None:
            err = self.log_file.read_text(errors="replace").strip().splitlines()[-1:]
            self._proc = None
            if err and "Address already in use" in err[0]:
                # another node of this machine shares the bridge and already serves it: its resolver answers our
                # desktops too; we try again every 30 s, so one of us takes over if it goes
                if self._shared_at is None:
                    log.info("network.resolver_shared", address=self.address)
                self._shared_at = time.monotonic()
                return
            raise DriverError(
                f"the desktops' DNS resolver did not start: {' '.join(err)[-300:]}", code="resolver_failed"
            )
        self._shared_at = None
        log.info("network.resolver_started", address=self.address, upstream=list(self.upstream) or "resolv.conf")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def ensure(self) -> None:
        """Start the resolver again if ours died, or (every 30 s) if the other node's may have gone."""
        if self.running:
            return
        if self._shared_at is not None:
            if time.monotonic() - self._shared_at < SHARED_RECHECK_S:
                return
        elif self._proc is not None:  # ours, and it exited
            log.warning("network.resolver_restarted", reason="the desktops' DNS resolver exited")
        await self.start()

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        self.pid_file.unlink(missing_ok=True)
