"""A real farm whose storage root is a GlusterFS replica-3 volume, and a storage machine that loses power.

Three storage machines in namespaces (``deckard.testing_storage``) hold the volume; it is made and mounted by the
documented commands and the all-in-one farm runs on it with its desktops' root layers on local disk
(``storage.local_layers``).  A user's desktop runs with its home on the volume when machine 2 loses power: the
desktop keeps running, the home stays readable and writable from inside it, and after machine 2 is back and
healed the home is intact across a stop and start.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deckard.client import broker as qvd
from deckard.drivers.gluster import GlusterCli
from deckard.testing import FarmProcess, e2e_unavailable_reason, wait_for
from deckard.testing_storage import GlusterMachines, gluster_unavailable_reason

pytestmark = pytest.mark.e2e

PASSWORD = "s3cret!"
DECKARD = [sys.executable, "-m", "deckard.cli.main"]


@pytest.fixture(scope="module")
def gluster_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GlusterMachines, FarmProcess]]:
    reason = e2e_unavailable_reason() or gluster_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with GlusterMachines(tmp_path_factory.mktemp("gluster")) as machines:
        bricks = [arg for i in (1, 2, 3) for arg in ("--brick", machines.brick(i))]
        subprocess.run(
            [*machines.on_machine(1), *DECKARD, "storage", "gluster", "create", *bricks, "--force"], check=True
        )
        farm = FarmProcess(extra_env={"DECKARD_STORAGE__LOCAL_LAYERS": "1"})
        machines.mounted(farm.home / "storage")
        try:
            servers = ",".join(machines.address(i) for i in (1, 2, 3))
            mount = ["storage", "gluster", "mount", "--server", servers, "--home", str(farm.home)]
            subprocess.run([*machines.on_node(), *DECKARD, *mount], check=True)
            farm.up()
            yield machines, farm
        finally:
            farm.close()


async def _first_byte(farm: FarmProcess, desktop_id: int) -> None:
    reader, writer = await qvd.connect(farm.broker, "gina", PASSWORD, farm.ca, desktop_id)
    try:
        await asyncio.wait_for(reader.readexactly(1), 30)
    finally:
        writer.close()


def test_a_desktop_keeps_running_and_its_home_when_a_storage_machine_loses_power(
    gluster_farm: tuple[GlusterMachines, FarmProcess],
) -> None:
    machines, farm = gluster_farm
    desk = farm.user_with_desktop("gina", PASSWORD, "gina-desk")
    asyncio.run(_first_byte(farm, desk["id"]))
    assert farm.attach(desk["id"], "echo kept > ~/kept.txt && sync", user="gina").returncode == 0
    homes = farm.home / "storage" / "homes"
    assert [p.read_text() for p in homes.glob("*/*/kept.txt")] == ["kept\n"]  # the home is on the volume
    for i in (1, 2, 3):
        assert list(Path(machines.brick(i).split(":", 1)[1]).glob("homes/*/*/kept.txt")), f"no copy on machine {i}"

    machines.power_off(2)
    t0 = time.monotonic()
    inside = farm.attach(desk["id"], "cat ~/kept.txt && echo more >> ~/kept.txt && sync", user="gina")
    stall = time.monotonic() - t0
    assert inside.returncode == 0 and inside.stdout == "kept\n", inside.stderr
    assert stall < 15, f"the home stalled {stall:.1f} s inside the desktop"
    assert farm.desktop("gina-desk")["state"] == "running"
    asyncio.run(_first_byte(farm, desk["id"]))  # the display still answers through the broker

    machines.power_on(2)
    cli = GlusterCli(machines.gluster(1))
    wait_for(lambda: asyncio.run(cli.redundant("deckard", machines.node_address)), 30, 0.5, "machine 2 healed")
    farm.deckard("desktop", "stop", "gina-desk")
    wait_for(lambda: farm.desktop("gina-desk")["state"] == "stopped", 60, 0.3, "stopped")
    asyncio.run(_first_byte(farm, desk["id"]))
    again = farm.attach(desk["id"], "cat ~/kept.txt", user="gina")
    assert again.stdout == "kept\nmore\n", again.stderr
    print(f"home stall inside the desktop after a storage machine lost power: {stall:.2f} s")
