"""The container driver against real LXC: a desktop starts, shows a real desktop over VNC, keeps only its home.

Needs root, the LXC tools and debootstrap.  The image is built once by the image builder and cached in
``/var/cache/deckard/images`` (``DECKARD_IMAGE_CACHE`` overrides), so after the first run only the guests cost time.
Each test runs on its own bridge and farm directory; fixtures remove containers, overlays, cgroups and
the bridge even when a test fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from deckard.client.rfb import RFBError, grab_framebuffer, handshake, is_blank
from deckard.drivers.base import AGENT_PORT, DISPLAY_PORT, GuestSpec
from deckard.drivers.cgroups import CGROUP_ROOT, Limits, limits, memory_stat, remove_cgroups
from deckard.drivers.container import ContainerDriver, recorded_init
from deckard.drivers.display import display_password
from deckard.drivers.lxc_config import CFS_PERIOD_US, PIDS_MAX
from deckard.drivers.network import (
    ensure_bridge,
    isolate_port,
    port_isolated,
    remove_bridge,
    run_command,
    veth_name,
)
from deckard.runtime.paths import FarmPaths
from deckard.testing import image_cache

pytestmark = pytest.mark.e2e

CACHE_DIR = image_cache()
MIB = 1024 * 1024


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (LXC containers, bridges, debootstrap)"
    for tool in ("lxc-start", "lxc-stop", "lxc-info", "debootstrap", "zstd", "bridge"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install lxc debootstrap zstd iproute2)"
    return None


@pytest.fixture(scope="session")
def image_path() -> Path:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from deckard.images.builder import build_image

    t0 = time.monotonic()
    path = asyncio.run(build_image(CACHE_DIR, cache_dir=CACHE_DIR, progress=lambda _text, _frac: None))
    print(f"\nimage {path.name} ready in {time.monotonic() - t0:.1f} s")
    # images of older agent versions are dead weight in the test cache (150 MB each)
    for old in CACHE_DIR.glob("deckard-minimal-*.tar.zst"):
        if old != path:
            old.unlink()
    return path


@pytest.fixture
def farm() -> Iterator[FarmPaths]:
    # not under pytest's tmp_path: its 0700 parents keep the desktops' unprivileged root from the storage
    paths = FarmPaths(Path(tempfile.mkdtemp(prefix="deckard-driver-")))
    paths.make()
    try:
        yield paths
    finally:
        shutil.rmtree(paths.home, ignore_errors=True)


@pytest.fixture
async def bridge() -> AsyncIterator[tuple[str, str]]:
    """A private bridge and /24 for this test: (bridge name, '10.213.X')."""
    pid = os.getpid()
    name, net = f"dkt{pid % 10000}", f"10.213.{20 + pid % 200}"
    await ensure_bridge(name, f"{net}.1/24")
    try:
        yield name, net
    finally:
        await remove_bridge(name)


@pytest.fixture
async def driver(farm: FarmPaths, image_path: Path) -> AsyncIterator[ContainerDriver]:  # noqa: ARG001 (built first)
    drv = ContainerDriver(farm)
    try:
        yield drv
    finally:
        for info in await drv.list():
            await drv.kill(info.guest_name)
        for guest in (farm.guest_name(n) for n in range(1, 4)):
            remove_cgroups(guest)
        shutil.rmtree(farm.home, ignore_errors=True)


def make_spec(farm: FarmPaths, image: Path, bridge: tuple[str, str], n: int, login: str, uid: int) -> GuestSpec:
    name, net = bridge
    return GuestSpec(
        desktop_id=n,
        guest_name=farm.guest_name(n),
        image_id=1,
        image_path=image,
        ip=f"{net}.{100 + n}",
        prefix_len=24,
        gateway=f"{net}.1",
        mac=f"54:52:00:d5:{int(net.split('.')[2]):02x}:{100 + n:02x}",
        bridge=name,
        memory_mib=512,
        cpus=1.0,
        user_login=login,
        user_uid=uid,
        home_dir=farm.user_home("t1", login),
        agent_token=f"token-{n}",
    )


async def call_agent(spec: GuestSpec, method: str, timeout: float = 15.0, **params: object) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        resp = await client.post(
            f"http://{spec.ip}:{AGENT_PORT}/vma/{method}",
            params={k: str(v) for k, v in params.items()},
            headers={"Authorization": f"Bearer {spec.agent_token}"},
        )
    body: dict[str, object] = resp.json()
    assert resp.status_code == 200 and body["ok"], body
    return body


async def wait_for_agent(spec: GuestSpec, timeout: float = 10.0) -> float:
    """Poll ping until the agent answers; return the seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            await call_agent(spec, "ping", timeout=1.0)
            return time.monotonic() - t0
        except (httpx.TransportError, AssertionError):
            if time.monotonic() - t0 > timeout:
                raise
            await asyncio.sleep(0.02)


async def grab_desktop(spec: GuestSpec, timeout: float = 10.0) -> tuple[int, int, bytes]:
    """Grab frames until one is not blank (the session draws a moment after Xvnc listens)."""
    deadline = time.monotonic() + timeout
    password = display_password(spec.agent_token)
    while True:
        reader, writer = await asyncio.open_connection(spec.ip, DISPLAY_PORT)
        try:
            grab = grab_framebuffer(reader, writer, until_drawn=10, password=password)
            width, height, pixels = await asyncio.wait_for(grab, 15.0)
        finally:
            writer.close()
        if not is_blank(pixels) or time.monotonic() > deadline:
            return width, height, pixels
        await asyncio.sleep(0.2)


async def start_two(
    driver: ContainerDriver, farm: FarmPaths, image: Path, bridge: tuple[str, str]
) -> tuple[GuestSpec, GuestSpec]:
    """alice's and bob's desktops on the same bridge, started at once, their agents answering."""
    first = make_spec(farm, image, bridge, 1, "alice", 10001)
    second = make_spec(farm, image, bridge, 2, "bob", 10002)
    await asyncio.gather(driver.start(first), driver.start(second))
    await asyncio.gather(wait_for_agent(first), wait_for_agent(second))
    return first, second


async def attach(farm: FarmPaths, guest: str, *cmd: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "lxc-attach",
        "-n",
        guest,
        "-P",
        str(farm.lxc),
        "--clear-env",
        "--",
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


def leftovers(farm: FarmPaths, guest: str) -> list[str]:
    found = [str(p) for p in (farm.lxc / guest, farm.overlays / guest) if p.exists()]
    found += [str(p) for pattern in (f"lxc.*.{guest}", f"*/**/lxc.*.{guest}") for p in CGROUP_ROOT.glob(pattern)]
    if Path("/sys/class/net", veth_name(guest)).exists():
        found.append(veth_name(guest))
    return found


async def test_desktop_starts_shows_a_desktop_and_keeps_only_the_home(
    driver: ContainerDriver, farm: FarmPaths, image_path: Path, bridge: tuple[str, str]
) -> None:
    """Start → agent → X for alice → a non-blank frame; after a restart the home survives, /usr is reset and
    alice's display starts with the desktop."""
    spec = make_spec(farm, image_path, bridge, 1, "alice", 10001)
    await driver.ensure_basefs(spec.image_id, spec.image_path)  # unpacking is timed separately below

    t0 = time.monotonic()
    info = await driver.start(spec)
    started = time.monotonic() - t0
    assert info.running and info.pid and info.ip == spec.ip
    ping_after = started + await wait_for_agent(spec)
    assert await port_isolated(veth_name(spec.guest_name))

    t1 = time.monotonic()
    reply = await call_agent(spec, "x_start", user="alice", uid=10001)
    x_start = time.monotonic() - t1
    assert reply["state"] == "listening"
    assert (await call_agent(spec, "x_start", user="alice", uid=10001)).get("already") is True

    width, height, pixels = await grab_desktop(spec)
    assert (width, height) == (1280, 800)
    assert not is_blank(pixels), "the desktop framebuffer is a single colour: the session did not draw"
    await asyncio.sleep(2.0)  # let the session settle before measuring memory
    assert (await call_agent(spec, "x_state"))["state"] in ("listening", "connected")

    rc, out = await attach(farm, spec.guest_name, "/bin/sh", "-c", "touch /usr/deckard-e2e && id alice")
    assert rc == 0 and "uid=10001(alice) gid=10001(alice)" in out, out
    rc, out = await attach(
        farm, spec.guest_name, "/usr/sbin/runuser", "-u", "alice", "--", "/bin/sh", "-c", "echo kept > ~/kept.txt"
    )
    assert rc == 0, out
    assert (spec.home_dir / "kept.txt").read_text() == "kept\n"

    idle = await driver.inspect(spec.guest_name)
    assert idle is not None and idle.memory_bytes is not None and idle.pid is not None
    # the kernel has the desktop's limits (a config in the other cgroup layout's keys would leave none)
    assert limits(idle.pid) == Limits(
        memory_bytes=512 * MIB, cpu_quota_us=CFS_PERIOD_US, cpu_period_us=CFS_PERIOD_US, pids=PIDS_MAX
    )
    stat = memory_stat(idle.pid)
    rss, cache = stat.get("total_rss", stat.get("anon", 0)), stat.get("total_cache", stat.get("file", 0))  # v1, v2
    print(
        f"\nlxc-start {started * 1000:.0f} ms; agent ping answered {ping_after * 1000:.0f} ms after start;"
        f" x_start {x_start * 1000:.0f} ms; idle desktop memory {idle.memory_bytes / MIB:.1f} MiB"
        f" (rss {rss / MIB:.1f} MiB, cache {cache / MIB:.1f} MiB)"
    )
    assert idle.memory_bytes <= 120 * MIB

    t2 = time.monotonic()
    await driver.stop(spec.guest_name)
    print(f"graceful stop {(time.monotonic() - t2) * 1000:.0f} ms")
    assert await driver.inspect(spec.guest_name) is None
    assert leftovers(farm, spec.guest_name) == []

    await driver.start(spec)
    await wait_for_agent(spec)
    rc, out = await attach(farm, spec.guest_name, "/bin/sh", "-c", "ls /usr/deckard-e2e; cat /home/alice/kept.txt")
    assert "No such file" in out and "kept" in out, out
    # the desktop's user's display comes up at boot, before anyone asks (a connect finds it up or coming)
    early = await call_agent(spec, "x_state")
    assert early["state"] in ("provisioning", "starting", "listening") and early["user"] == "alice", early

    # its state comes from the init noted at start (no lxc-info) until that init is gone; then LXC says
    running = await driver.inspect(spec.guest_name)
    assert running is not None and running.running and running.pid == recorded_init(farm.lxc / spec.guest_name)
    assert [g.guest_name for g in await driver.list() if g.running] == [spec.guest_name]
    stopped = await run_command(["lxc-stop", "-n", spec.guest_name, "-P", str(farm.lxc), "-k"], check=False)
    assert stopped.returncode == 0, stopped.stderr
    gone = await driver.inspect(spec.guest_name)
    assert gone is not None and not gone.running and recorded_init(farm.lxc / spec.guest_name) is None

    await driver.kill(spec.guest_name)
    await driver.kill(spec.guest_name)  # idempotent
    assert leftovers(farm, spec.guest_name) == []
    assert await driver.list() == []


async def test_desktops_reach_the_host_but_not_each_other(
    driver: ContainerDriver, farm: FarmPaths, image_path: Path, bridge: tuple[str, str]
) -> None:
    """Bridge ports are isolated: a desktop reaches its own services (the probe works), never another desktop."""
    first, second = await start_two(driver, farm, image_path, bridge)
    assert {info.guest_name for info in await driver.list()} == {first.guest_name, second.guest_name}

    probe = (
        "import socket,sys\n"
        "def ok(h,p):\n"
        "    try:\n"
        "        socket.create_connection((h,p),timeout=2).close(); return 'open'\n"
        "    except OSError as e: return 'closed'\n"
        "print(ok(sys.argv[1],int(sys.argv[2])), ok(sys.argv[3],int(sys.argv[4])))\n"
    )
    rc, out = await attach(
        farm, second.guest_name, "/usr/bin/python3", "-c", probe, second.ip, str(AGENT_PORT), first.ip, str(AGENT_PORT)
    )
    assert rc == 0, out
    assert out.split() == ["open", "closed"], f"own agent reachable, other desktop not; got {out!r}"


async def test_agent_switches_users_expires_and_powers_off(
    driver: ContainerDriver, farm: FarmPaths, image_path: Path, bridge: tuple[str, str]
) -> None:
    """x_start for another user replaces the display; poweroff from the agent stops the container."""
    spec = make_spec(farm, image_path, bridge, 3, "alice", 10001)
    await driver.start(spec)
    await wait_for_agent(spec)
    await call_agent(spec, "x_start", user="alice", uid=10001, geometry="1024x768")
    assert (await call_agent(spec, "expire"))["notified"] == "xmessage"
    reply = await call_agent(spec, "x_start", user="bob", uid=10002)
    assert reply["user"] == "bob" and not reply.get("already")
    assert (await call_agent(spec, "x_state"))["user"] == "bob"
    width, height, pixels = await grab_desktop(spec)
    assert (width, height) == (1280, 800) and not is_blank(pixels)
    assert (await call_agent(spec, "x_stop"))["state"] == "stopped"

    await call_agent(spec, "poweroff")
    deadline = time.monotonic() + 10
    while (info := await driver.inspect(spec.guest_name)) is not None and info.running:
        assert time.monotonic() < deadline, "the container did not stop after the agent's poweroff"
        await asyncio.sleep(0.1)
    await driver.kill(spec.guest_name)
    assert leftovers(farm, spec.guest_name) == []


# What root inside a desktop tries, run by the agent (exec RPC) as every process of the desktop is run: in its
# namespaces, under its no_new_privs and seccomp policy, with the capabilities the agent kept for everything but
# the mounter of shared folders (vma/shares.py).  Each line prints "name result".
ROOT_PROBE = r"""
import ctypes, errno, os, struct
libc = ctypes.CDLL(None, use_errno=True)
def res(rc):
    return "ok" if rc >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
print("uid_map", "_".join(open("/proc/self/uid_map").read().split()))
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
for key in ("CapEff", "CapBnd", "NoNewPrivs", "Seccomp"):
    print(key, status[key].strip())
# name_to_handle_at + open_by_handle_at on the home bind mount: the way out that an outside tester used
handle = ctypes.create_string_buffer(struct.pack("II", 128, 0) + bytes(128))
mount_id = ctypes.c_int()
print("name_to_handle_at", res(libc.syscall(303, -100, b"/home/alice", handle, ctypes.byref(mount_id), 0)))
fd = os.open("/home", os.O_RDONLY)
# a handle of inode 2 (the root of an ext4 file system) on the home's mount
root_handle = ctypes.create_string_buffer(struct.pack("IiII", 8, 1, 2, 0))
print("open_by_handle_at", res(libc.syscall(304, fd, root_handle, os.O_RDONLY)))
attr = ctypes.create_string_buffer(struct.pack("IIII", 2, 4, 4, 1) + bytes(112))  # BPF_MAP_CREATE, array
print("bpf", res(libc.syscall(321, 0, attr, 128)))
print("perf_event_open", res(libc.syscall(298, ctypes.create_string_buffer(128), 0, -1, -1, 0)))
print("unshare_user", res(libc.unshare(0x10000000)))
print("mount", res(libc.mount(b"none", b"/mnt", b"tmpfs", 0, None)))
print("init_module", res(libc.syscall(175, None, 0, b"")))
print("kcore_bytes", len(open("/proc/kcore", "rb").read(16)) if os.path.exists("/proc/kcore") else "absent")
try:
    open("/proc/sysrq-trigger", "w").write("h")
    print("sysrq", "ok")
except OSError as e:
    print("sysrq", errno.errorcode[e.errno])
pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
cmdlines = [open(f"/proc/{p}/cmdline", "rb").read() for p in pids if os.path.exists(f"/proc/{p}/cmdline")]
marker = ("py" + "test").encode()  # not spelled out: this probe's own command line holds its text
print("host_processes", sum(marker in c for c in cmdlines))
print("max_pid_seen", max(pids))
# the mounter keeps CAP_SYS_ADMIN: it must be alone with it, and out of root's reach
def eff(p):
    try:
        return int(dict(l.split(":", 1) for l in open(f"/proc/{p}/status").read().splitlines())["CapEff"], 16)
    except OSError:
        return 0
mounters = [p for p in pids if eff(p) >> 21 & 1]
print("mounters", len(mounters))
for p in mounters:
    try:
        open(f"/proc/{p}/mem", "rb").close()
        print("mounter_mem", "ok")
    except OSError as e:
        print("mounter_mem", errno.errorcode[e.errno])
    print("mounter_ptrace", res(libc.ptrace(16, p, None, None)))  # PTRACE_ATTACH
"""


async def test_root_in_a_desktop_cannot_reach_the_host(
    driver: ContainerDriver, farm: FarmPaths, image_path: Path, bridge: tuple[str, str]
) -> None:
    """uid 0 inside is an unprivileged host uid; no open_by_handle_at, BPF, perf, modules, namespaces, mounts."""
    # with the mounter of shared folders (nx.shares.in_containers), the case where the desktop's init has more
    spec = dataclasses.replace(make_spec(farm, image_path, bridge, 1, "alice", 10001), mounter=True)
    info = await driver.start(spec)
    await wait_for_agent(spec)
    await call_agent(spec, "x_start", user="alice", uid=10001)  # the home exists and is alice's

    # seen from the host: the agent (the desktop's PID 1) runs as the farm's unprivileged base uid
    host_status = dict(line.split(":", 1) for line in Path(f"/proc/{info.pid}/status").read_text().splitlines())
    host_uid = int(host_status["Uid"].split()[0])
    assert host_uid == driver.id_base and host_uid >= 1 << 24, host_uid
    assert (spec.home_dir.stat().st_uid, spec.home_dir.stat().st_mode & 0o777) == (driver.id_base + 10001, 0o750)

    ran = await call_agent(spec, "exec", command=f"python3 - <<'EOF'\n{ROOT_PROBE}\nEOF", timeout=20)
    out = str(ran["stdout"]) + str(ran.get("stderr", ""))
    assert ran["returncode"] == 0, ran
    seen = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert seen["uid_map"] == f"0_{driver.id_base}_{1 << 24}", seen
    # chown fowner kill setgid setuid, nothing else (no dac_read_search, dac_override, bpf, perfmon, ...)
    assert seen["CapEff"] == seen["CapBnd"] == "00000000000000e9", seen
    assert (seen["NoNewPrivs"], seen["Seccomp"]) == ("1", "2"), seen
    for call in ("name_to_handle_at", "open_by_handle_at", "bpf", "perf_event_open", "unshare_user", "mount"):
        assert seen[call] == "EPERM", (call, seen)
    assert seen["init_module"] == "EPERM", seen
    assert seen["kcore_bytes"] in ("0", "absent"), "the host's memory image is masked"
    assert seen["sysrq"] in ("EROFS", "EACCES", "EPERM", "ENOENT"), seen
    assert seen["host_processes"] == "0", "the desktop sees its own processes only"
    assert int(seen["max_pid_seen"]) < 1000, seen
    assert seen["mounters"] == "1", seen
    assert seen["mounter_mem"] in ("EACCES", "EPERM") and seen["mounter_ptrace"] == "EPERM", seen


async def test_a_desktops_display_needs_the_secret_that_only_the_broker_has(
    driver: ContainerDriver, farm: FarmPaths, image_path: Path, bridge: tuple[str, str]
) -> None:
    """Xvnc offers VNC authentication only; another desktop cannot take the display even with routing allowed."""
    first, second = await start_two(driver, farm, image_path, bridge)
    await call_agent(first, "x_start", user="alice", uid=10001)

    # from the node, without the secret or with a wrong one: refused
    for password in (None, "wrong!!!"):
        reader, writer = await asyncio.open_connection(first.ip, DISPLAY_PORT)
        try:
            with pytest.raises(RFBError, match=r"password|Authentication failure"):
                await asyncio.wait_for(handshake(reader, writer, password=password), 10)
        finally:
            writer.close()
    width, _height, _pixels = await grab_desktop(first)  # with the secret: the desktop
    assert width == 1280

    # from the second desktop
    probe = (
        "import socket,struct,sys\n"
        "s=socket.create_connection((sys.argv[1],5900),timeout=3)\n"
        "s.recv(12); s.sendall(b'RFB 003.008\\n')\n"
        "n=s.recv(1)[0]; types=list(s.recv(n))\n"
        "s.sendall(b'\\x02'); s.recv(16); s.sendall(bytes(16))\n"
        "print('types', types, 'result', struct.unpack('!I', s.recv(4))[0])\n"
    )
    # first with the bridge's isolation lifted and the node's filter letting the pair through (br_netfilter
    # sends bridged frames through it here): the display answers, but only to VNC authentication, and refuses
    veths = [veth_name(spec.guest_name) for spec in (first, second)]
    allow = ["FORWARD", "-s", second.ip, "-d", first.ip, "-j", "ACCEPT"]
    for veth in veths:
        await run_command(["bridge", "link", "set", "dev", veth, "isolated", "off"])
    await run_command(["iptables", "-I", *allow])
    try:
        rc, out = await attach(farm, second.guest_name, "/usr/bin/python3", "-c", probe, first.ip)
    finally:
        await run_command(["iptables", "-D", *allow], check=False)
        for veth in veths:
            await isolate_port(veth)
    assert rc == 0 and out.split() == ["types", "[2]", "result", "1"], out
    # then as desktops really are: the port cannot even be reached
    rc, out = await attach(farm, second.guest_name, "/usr/bin/python3", "-c", probe, first.ip)
    assert rc != 0 and ("timed out" in out or "refused" in out or "unreachable" in out.lower()), out
