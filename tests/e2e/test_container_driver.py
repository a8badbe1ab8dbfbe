"""The container driver against real LXC: a desktop starts, shows a real desktop over VNC, keeps only its home.

Needs root, the LXC tools and debootstrap.  The image is built once by the image builder and cached in
``.cache/images`` (``DECKARD_IMAGE_CACHE`` overrides), so after the first run only the guests cost time.
Each test runs on its own bridge and farm directory; fixtures remove containers, overlays, cgroups and
the bridge even when a test fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from deckard.client.rfb import grab_framebuffer, is_blank
from deckard.drivers.base import AGENT_PORT, DISPLAY_PORT, GuestSpec
from deckard.drivers.container import CGROUP_ROOT, ContainerDriver, memory_stat, remove_cgroups
from deckard.drivers.network import ensure_bridge, port_isolated, remove_bridge, veth_name
from deckard.runtime.paths import FarmPaths

pytestmark = pytest.mark.e2e

CACHE_DIR = Path(os.environ.get("DECKARD_IMAGE_CACHE") or Path(__file__).parents[2] / ".cache" / "images")
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
    path = asyncio.run(build_image(CACHE_DIR, cache_dir=CACHE_DIR, progress=lambda text, frac: None))
    print(f"\nimage {path.name} ready in {time.monotonic() - t0:.1f} s")
    # images of older agent versions are dead weight in the test cache (150 MB each)
    for old in CACHE_DIR.glob("deckard-desktop-*.tar.zst"):
        if old != path:
            old.unlink()
    return path


@pytest.fixture
def farm(tmp_path: Path) -> FarmPaths:
    paths = FarmPaths(tmp_path / "farm")
    paths.make()
    return paths


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
async def driver(farm: FarmPaths, image_path: Path) -> AsyncIterator[ContainerDriver]:
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


async def grab_desktop(ip: str, timeout: float = 10.0) -> tuple[int, int, bytes]:
    """Grab frames until one is not blank (the session draws a moment after Xvnc listens)."""
    deadline = time.monotonic() + timeout
    while True:
        reader, writer = await asyncio.open_connection(ip, DISPLAY_PORT)
        try:
            width, height, pixels = await asyncio.wait_for(grab_framebuffer(reader, writer, until_drawn=10), 15.0)
        finally:
            writer.close()
        if not is_blank(pixels) or time.monotonic() > deadline:
            return width, height, pixels
        await asyncio.sleep(0.2)


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
    found += [str(p) for p in CGROUP_ROOT.glob(f"*/**/lxc.*.{guest}")]
    if Path("/sys/class/net", veth_name(guest)).exists():
        found.append(veth_name(guest))
    return found


async def test_desktop_starts_shows_a_desktop_and_keeps_only_the_home(
    driver: ContainerDriver, farm: FarmPaths, image_path: Path, bridge: tuple[str, str]
) -> None:
    """Start → agent → X for alice → a non-blank frame; after a restart the home survives and /usr is reset."""
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

    width, height, pixels = await grab_desktop(spec.ip)
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
    stat = memory_stat(idle.pid)
    print(
        f"\nlxc-start {started * 1000:.0f} ms; agent ping answered {ping_after * 1000:.0f} ms after start;"
        f" x_start {x_start * 1000:.0f} ms; idle desktop memory {idle.memory_bytes / MIB:.1f} MiB"
        f" (rss {stat.get('total_rss', 0) / MIB:.1f} MiB, cache {stat.get('total_cache', 0) / MIB:.1f} MiB)"
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
    assert (await call_agent(spec, "x_state"))["state"] == "stopped"

    await driver.kill(spec.guest_name)
    await driver.kill(spec.guest_name)  # idempotent
    assert leftovers(farm, spec.guest_name) == []
    assert await driver.list() == []


async def test_desktops_reach_the_host_but_not_each_other(
    driver: ContainerDriver, farm: FarmPaths, image_path: Path, bridge: tuple[str, str]
) -> None:
    """Bridge ports are isolated: a desktop reaches its own services (the probe works), never another desktop."""
    first = make_spec(farm, image_path, bridge, 1, "alice", 10001)
    second = make_spec(farm, image_path, bridge, 2, "bob", 10002)
    await asyncio.gather(driver.start(first), driver.start(second))
    await asyncio.gather(wait_for_agent(first), wait_for_agent(second))
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
    width, height, pixels = await grab_desktop(spec.ip)
    assert (width, height) == (1280, 800) and not is_blank(pixels)
    assert (await call_agent(spec, "x_stop"))["state"] == "stopped"

    await call_agent(spec, "poweroff")
    deadline = time.monotonic() + 10
    while (info := await driver.inspect(spec.guest_name)) is not None and info.running:
        assert time.monotonic() < deadline, "the container did not stop after the agent's poweroff"
        await asyncio.sleep(0.1)
    await driver.kill(spec.guest_name)
    assert leftovers(farm, spec.guest_name) == []
