"""Warm pools on a real farm (``docs/pools.md``): a user who connects to a stopped desktop takes over a container that
was started before they asked.  It gets their home, their account and the desktop's own address; the next user
gets another guest, with nothing of the first one's; the pool is filled again at once, and deleting it stops its
guests and leaves no mount behind.

The pool is for an image tag of its own (``warm``) in the default OSF, so the other modules' desktops on this shared
farm keep starting the usual way.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from deckard.client import broker as qvd
from deckard.client.rfb import grab_framebuffer, is_blank
from deckard.testing import FarmProcess, wait_for

pytestmark = pytest.mark.e2e
SHARED_FARM = True  # tests/e2e/conftest.py: its own users, desktops and tag; the pool is deleted at the end

PASSWORD = "warm-Pa55word!"


def _pool(farm: FarmProcess) -> dict:
    rows = farm.json("pool", "list")
    assert isinstance(rows, list)
    return next(r for r in rows if r["tag"] == "warm")


def _ready(farm: FarmProcess) -> None:
    wait_for(lambda: _pool(farm)["ready"] >= 1, 120, 0.2, "a ready warm guest")


def _warm_guests(farm: FarmProcess) -> list[str]:
    return [g for g in farm.guests() if "-w" in g]


@pytest.fixture(scope="module")
def pool(farm: FarmProcess) -> Iterator[None]:
    images = farm.json("image", "list")
    assert isinstance(images, list)
    image = next(i for i in images if "default" in (i.get("tags") or "") and i["osf"] == "default")
    farm.deckard("image", "tag", str(image["id"]), "warm")
    farm.deckard("pool", "set", "default", "--tag", "warm", "--size", "1")
    try:
        yield
    finally:
        farm.deckard("pool", "delete", "default", "--tag", "warm", check=False)
        farm.deckard("image", "untag", str(image["id"]), "warm", check=False)


def _connect(farm: FarmProcess, login: str, desktop_id: int) -> None:
    async def see() -> None:
        reader, writer = await qvd.connect(farm.broker, login, PASSWORD, farm.ca, desktop_id)
        try:
            _w, _h, pixels = await asyncio.wait_for(grab_framebuffer(reader, writer, until_drawn=15), 30)
            assert not is_blank(pixels), "the desktop framebuffer is blank"
        finally:
            writer.close()

    asyncio.run(see())


# who runs the desktop's shell, its terminal and what its menu started (``sleep 4321``): comm -> owners
OWNERS = (
    "import glob, pwd\n"
    "seen = {}\n"
    "for d in glob.glob('/proc/[0-9]*'):\n"
    "    try:\n"
    "        comm, cmd = open(d + '/comm').read().strip(), open(d + '/cmdline').read()\n"
    "        uid = int(open(d + '/status').read().split('Uid:')[1].split()[0])\n"
    "    except (OSError, IndexError):\n"
    "        continue\n"  # a process that ended while the others were read
    "    if comm in ('jwm', 'xterm') or cmd == 'sleep\\x004321\\x00':\n"
    "        seen.setdefault(comm, set()).add(pwd.getpwuid(uid).pw_name)\n"
    "print(sorted((k, sorted(v)) for k, v in seen.items()))"
)


def _owners(farm: FarmProcess, desktop_id: int) -> dict[str, set[str]] | None:
    out = farm.attach(desktop_id, f'python3 -c "{OWNERS}"').stdout
    owners = {comm: set(users) for comm, users in ast.literal_eval(out.strip() or "[]")}
    return owners if "sleep" in owners else None


def _stop(farm: FarmProcess, name: str) -> None:
    farm.deckard("desktop", "stop", name)
    wait_for(lambda: farm.desktop(name)["state"] == "stopped", 60, 0.2, f"{name} to stop")


@pytest.mark.usefixtures("pool")
def test_a_user_takes_a_warm_guest_over_with_their_home_account_and_address(farm: FarmProcess) -> None:
    _ready(farm)
    warm_before = set(_warm_guests(farm))
    ann = farm.user_with_desktop("wann", PASSWORD, "wann-desk", "--tag", "warm")
    _connect(farm, "wann", ann["id"])
    desk = farm.desktop("wann-desk")
    guest = farm._warm_guest(ann["id"])
    assert guest in warm_before, f"{guest} is not the warm guest that was ready ({warm_before})"
    who = farm.attach(ann["id"], "id -un; stat -c '%U %a' $HOME; touch $HOME/kept.txt && echo written", user="wann")
    assert who.stdout.split() == ["wann", "wann", "750", "written"], (
        who.stdout + who.stderr + farm.diagnostics(ann["id"])
    )
    jwm = "import glob; print(sum(open(p).read() == 'jwm\\n' for p in glob.glob('/proc/[0-9]*/comm')))"
    seen = farm.attach(ann["id"], f'grep -c " {desk["ip"]}$" /proc/net/fib_trie; ls /home; python3 -c "{jwm}"')
    assert seen.stdout.split()[1:] == ["wann", "1"], seen.stdout + seen.stderr  # only her home; her session runs
    assert int(seen.stdout.split()[0]) >= 1, seen.stdout  # the desktop's own address
    # the desktop's shell was drawn before she came, as nobody; her programs are hers, those of its menu too
    farm.attach(ann["id"], "setpriv --reuid=nobody --regid=nogroup --clear-groups deckard-open sleep 4321")
    owners = wait_for(lambda: _owners(farm, ann["id"]), 10, 0.1, "the menu's program")
    assert owners == {"jwm": {"nobody"}, "xterm": {"wann"}, "sleep": {"wann"}}, owners
    own = farm.attach(ann["id"], "deckard-open id -un", user="wann")  # her own: it is the program itself
    assert own.stdout.split() == ["wann"], own.stdout + own.stderr
    farm.attach(ann["id"], "echo secret > /tmp/ann-secret; echo here > /etc/ann-was-here")
    # the pool is filled again with a new guest
    wait_for(lambda: set(_warm_guests(farm)) - warm_before - {guest}, 120, 0.2, "a new warm guest")
    _ready(farm)
    _stop(farm, "wann-desk")
    assert guest not in farm.guests()

    bob = farm.user_with_desktop("wbob", PASSWORD, "wbob-desk", "--tag", "warm")
    _connect(farm, "wbob", bob["id"])
    other = farm._warm_guest(bob["id"])
    assert other and other != guest
    left = farm.attach(bob["id"], "ls /home; cat /tmp/ann-secret /etc/ann-was-here 2>&1 | grep -c 'No such'; id wann")
    assert left.stdout.split()[:2] == ["wbob", "2"] and "no such user" in (left.stdout + left.stderr), left
    _stop(farm, "wbob-desk")

    _ready(farm)  # ann again: another warm guest, her home as she left it
    _connect(farm, "wann", ann["id"])
    assert farm._warm_guest(ann["id"]) not in (None, guest)
    assert farm.attach(ann["id"], "ls $HOME/kept.txt", user="wann").returncode == 0
    _stop(farm, "wann-desk")


# the processes of a desktop holding CAP_SYS_ADMIN (bit 21 of CapEff): the mounter of shared folders alone, or none
SYS_ADMIN_HOLDERS = (
    "import glob\n"
    "def caps(p):\n"
    "    try:\n"
    "        return int(dict(l.split(':', 1) for l in open(p).read().splitlines())['CapEff'], 16)\n"
    "    except OSError:\n"
    "        return 0\n"  # a process that ended while the others were read
    "print(sum(caps(p) >> 21 & 1 for p in glob.glob('/proc/[0-9]*/status')))"
)


@pytest.mark.usefixtures("pool")
def test_a_warm_guest_has_the_mounter_of_shared_folders_exactly_when_the_farm_allows_it(farm: FarmProcess) -> None:
    """``nx.shares.in_containers`` (docs/clients.md, "Shared folders"): a desktop taken from the pool gets the
    mounter as a cold start would, and turning the setting off replaces the guests started with it."""
    _ready(farm)
    before = set(_warm_guests(farm))
    farm.deckard("config", "set", "nx.shares.in_containers", "true")
    try:
        wait_for(lambda: _pool(farm)["ready"] >= 1 and not before & set(_warm_guests(farm)), 120, 0.2, "a new guest")
        cid = farm.user_with_desktop("wcid", PASSWORD, "wcid-desk", "--tag", "warm")
        _connect(farm, "wcid", cid["id"])
        holders = farm.attach(cid["id"], f'python3 -c "{SYS_ADMIN_HOLDERS}"; test -S /run/deckard/shares.sock')
        assert (holders.stdout.split(), holders.returncode) == (["1"], 0), holders.stdout + holders.stderr
        _stop(farm, "wcid-desk")
        _ready(farm)
        with_mounter = set(_warm_guests(farm))
    finally:
        farm.deckard("config", "set", "nx.shares.in_containers", "false")
    wait_for(lambda: _pool(farm)["ready"] >= 1 and not with_mounter & set(_warm_guests(farm)), 120, 0.2, "a new guest")
    _connect(farm, "wcid", cid["id"])
    holders = farm.attach(cid["id"], f'python3 -c "{SYS_ADMIN_HOLDERS}"')
    assert holders.stdout.split() == ["0"], holders.stdout + holders.stderr
    _stop(farm, "wcid-desk")


@pytest.mark.usefixtures("pool")
def test_deleting_the_pool_stops_its_guests_and_leaves_no_mount(farm: FarmProcess) -> None:
    _ready(farm)
    farm.deckard("pool", "delete", "default", "--tag", "warm")
    wait_for(lambda: not _warm_guests(farm), 60, 0.2, "the warm guests to stop")
    mounts = Path("/proc/self/mounts").read_text()
    assert f"{farm.home}/run/warm/" not in mounts, "a warm guest's share of homes is still mounted"
    farm.deckard("pool", "set", "default", "--tag", "warm", "--size", "1")  # the fixture deletes it again


def test_pools_refuse_what_cannot_be_warm(farm: FarmProcess) -> None:
    farm.deckard("osf", "add", "wkeep", "--keep-overlay")
    try:
        out = farm.deckard("pool", "set", "wkeep", "--size", "1", check=False)
        assert out.returncode != 0 and "pool_unsupported" in out.stdout + out.stderr, out
        out = farm.deckard("pool", "set", "default", "--tag", "nope", "--size", "101", check=False)
        assert out.returncode != 0, out
    finally:
        farm.deckard("osf", "delete", "wkeep", check=False)
