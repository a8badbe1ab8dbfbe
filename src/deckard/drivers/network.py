"""The host side of the desktop network: the bridge, desktop veths, port isolation, neighbour entries.

Desktops sit on one Linux bridge with fixed IPs; the node has the gateway address on it, so the broker on
the host reaches every desktop directly.  Desktops must not reach each other: each desktop's host-side veth
is an *isolated* bridge port, and isolated ports only talk to non-isolated ones (the bridge itself, i.e. the
host).  What a desktop may reach through the node is the packet filter's to say (``drivers/firewall.py``).

Also home of :func:`run_command`, the one way drivers run a host command (without blocking the loop, output
captured, a DriverError that quotes the tool's own words on failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
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
    """Run a host command without blocking the event loop; raise DriverError on failure when ``check``.

    Started by :class:`subprocess.Popen` (``vfork`` and ``exec``: about a millisecond) and collected on the loop
    (its pipes and a pidfd), not through the loop's subprocess transport: uvloop's forks the whole process, about
    10 ms in a farm's process with the loop stopped meanwhile, and a desktop's start runs several commands."""
    proc = subprocess.Popen(  # noqa: ASYNC220 -- the point: vfork and exec return at once, the waiting is async
        args,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "LANG": "C"},
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await _communicate(proc, None if stdin is None else stdin.encode())
    except BaseException as e:  # the timeout, or the caller was cancelled: the command does not outlive the call
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await _reaped(proc)
        if isinstance(e, TimeoutError):
            raise DriverError(f"{args[0]} did not finish within {timeout:g} s", code="command_timeout") from None
        raise
    result = CommandResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and result.returncode != 0:
        words = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DriverError(
            f"{' '.join(args[:3])} failed (exit {result.returncode}): {' | '.join(words)}",
            details={"command": list(args), "stderr": result.stderr[-2000:]},
        )
    return result


async def _reaped(proc: subprocess.Popen[bytes]) -> None:
    """Wait on the loop (a pidfd) until ``proc`` exits, and reap it."""
    if proc.poll() is not None:
        return
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    pidfd = os.pidfd_open(proc.pid)

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    proc.wait()  # at once: it has exited


async def _communicate(proc: subprocess.Popen[bytes], data: bytes | None) -> tuple[bytes, bytes]:
    """``proc.communicate(data)`` on the event loop: the output read and the input written as the pipes allow;
    returns once both output pipes are closed and the process is reaped."""
    assert proc.stdout is not None and proc.stderr is not None
    loop = asyncio.get_running_loop()
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    output = {out_fd: bytearray(), err_fd: bytearray()}
    open_fds = set(output)
    closed = loop.create_future()
    pending = memoryview(data or b"")

    def readable(fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            output[fd] += chunk
            return
        loop.remove_reader(fd)
        open_fds.discard(fd)
        if not open_fds and not closed.done():
            closed.set_result(None)

    def writable() -> None:
        nonlocal pending
        assert proc.stdin is not None
        try:
            pending = pending[os.write(proc.stdin.fileno(), pending) :]
        except BlockingIOError:
            return
        except OSError:  # the command closed its input (a broken pipe): the rest is not wanted
            pending = pending[len(pending) :]
        if not pending:
            loop.remove_writer(proc.stdin.fileno())
            proc.stdin.close()

    try:
        for fd in output:
            os.set_blocking(fd, False)
            loop.add_reader(fd, readable, fd)
        if proc.stdin is not None:
            if pending:
                os.set_blocking(proc.stdin.fileno(), False)
                loop.add_writer(proc.stdin.fileno(), writable)
            else:
                proc.stdin.close()
        await closed
        await _reaped(proc)
    finally:
        for fd in output:
            loop.remove_reader(fd)
        if proc.stdin is not None and not proc.stdin.closed:
            loop.remove_writer(proc.stdin.fileno())
            proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    return bytes(output[out_fd]), bytes(output[err_fd])


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
