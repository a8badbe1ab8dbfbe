"""The host side of the desktop network: the bridge, desktop veths, port isolation, neighbour entries.

Desktops sit on one Linux bridge with fixed IPs; the node has the gateway address on it, so the broker on
the host reaches every desktop directly.  Desktops must not reach each other: each desktop's host-side veth
is an *isolated* bridge port, and isolated ports only talk to non-isolated ones (the bridge itself, i.e. the
host).  What a desktop may reach through the node is the packet filter's to say (``drivers/firewall.py``).

Also home of :func:`run_command`, the one way drivers run a host command (asyncio subprocess, output
captured, a DriverError that quotes the tool's own words on failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from deckard.model.errors import DriverError

log = structlog.get_logger()

IFNAMSIZ = 15  # longest interface name Linux accepts


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


async def run_command(
    args: Sequence[str], *, check: bool = True, timeout: float = 60.0, stdin: str | None = None
) -> CommandResult:
    """Run a host command without blocking the event loop; raise DriverError on failure when ``check``."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LANG": "C"},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(None if stdin is None else stdin.encode()), timeout)
    except BaseException as e:  # the timeout, or the caller was cancelled: the command does not outlive the call
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(e, TimeoutError):
            raise DriverError(f"{args[0]} did not finish within {timeout:.0f} s", code="command_timeout") from None
        raise
    result = CommandResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and result.returncode != 0:
        words = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DriverError(
            f"{' '.join(args[:3])} failed (exit {result.returncode}): {' | '.join(words)}",
            details={"command": list(args), "stderr": result.stderr[-2000:]},
        )
    return result


def veth_name(guest_name: str) -> str:
    """Host-side veth name of a guest: readable when it fits in 15 characters, a hash otherwise."""
    name = "v" + guest_name.replace("-", "")
    if len(name) <= IFNAMSIZ:
        return name
    return "v" + hashlib.sha256(guest_name.encode()).hexdigest()[: IFNAMSIZ - 1]


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


async def ensure_bridge(bridge: str, address_cidr: str) -> None:
    """Create the desktop bridge if missing, give the host its gateway address on it, bring it up."""
    if len(bridge) > IFNAMSIZ:
        raise DriverError(f"bridge name {bridge!r} is longer than {IFNAMSIZ} characters", code="bad_bridge")
    if not link_exists(bridge):
        await run_command(["ip", "link", "add", "name", bridge, "type", "bridge"])
        log.info("network.bridge_created", bridge=bridge)
    await run_command(["ip", "addr", "replace", address_cidr, "dev", bridge])
    await run_command(["ip", "link", "set", bridge, "up"])


async def remove_bridge(bridge: str) -> None:
    """Delete the bridge (tests; ``firewall.remove`` removes its filter); a bridge that is already gone is fine."""
    if link_exists(bridge):
        await run_command(["ip", "link", "del", bridge], check=False)


def _isolated_flag(port: str) -> Path:
    """A bridge port's isolation flag in sysfs (Linux ≥ 4.18; LXC's up hook writes it too, ``lxc_config``)."""
    return Path(f"/sys/class/net/{port}/brport/isolated")


async def isolate_port(veth: str) -> None:
    """Make a bridge port isolated, so it can only talk to the host, not to other desktops."""
    try:  # no program to start where the kernel has the flag
        _isolated_flag(veth).write_text("1")
    except OSError:
        await run_command(["bridge", "link", "set", "dev", veth, "isolated", "on"])


async def port_isolated(veth: str) -> bool:
    try:
        return _isolated_flag(veth).read_text().strip() == "1"
    except OSError:
        result = await run_command(["bridge", "-d", "link", "show", "dev", veth], check=False)
        return "isolated on" in result.stdout


async def flush_neighbour(ip: str) -> None:
    """Forget the guest's MAC: a new guest with the same IP would otherwise stall for up to 30 s."""
    if neighbour_known(ip):  # most often it is not (the last stop flushed it): no program to start then
        await run_command(["ip", "neigh", "flush", "to", ip], check=False)


def neighbour_known(ip: str, table: Path = Path("/proc/net/arp")) -> bool:
    """Whether this namespace's IPv4 neighbour table has an entry for ``ip`` (True when it cannot tell)."""
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return True
    return any(line.split(maxsplit=1)[0] == ip for line in lines if line.strip())


async def run_batch(program: str, commands: Iterable[str]) -> None:
    """Many ``ip`` or ``bridge`` commands in one process (``-force -batch``: one failing does not stop the rest)."""
    fd, path = tempfile.mkstemp(prefix=f".deckard-{program}-", suffix=".batch")
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{command}\n" for command in commands)
    try:
        await run_command([program, "-force", "-batch", path], check=False)
    finally:
        os.unlink(path)


async def flush_neighbours(ips: Sequence[str]) -> None:
    """:func:`flush_neighbour` for many addresses in one ``ip -batch``."""
    await run_batch("ip", (f"neigh flush to {ip}" for ip in ips))


async def delete_link(name: str) -> None:
    if link_exists(name):
        await run_command(["ip", "link", "del", name], check=False)
