"""``run_command``: a host command run without blocking the loop (``subprocess.Popen``, its pipes and a pidfd on
the loop), on asyncio's loop and on uvloop's (the farm's): output, input, exit codes, timeouts and cancels, and no
process left behind."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from deckard.drivers.network import run_command
from deckard.model.errors import DriverError

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Runner]:
    """The loop to run the test on; afterwards, no child of this process that was not there before (a worker may
    have children of its own from earlier tests: a CLI server, a directory)."""
    before = _children()
    yield asyncio.run if request.param == "asyncio" else uvloop.run
    assert not _children() - before, "a command outlived its call"


def _children() -> set[int]:
    """This process's children (zombies included)."""
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                found.add(int(entry.name))
    return found


def test_output_input_and_exit_codes(run: Runner) -> None:
    async def main() -> None:
        done = await run_command(["sh", "-c", "echo out; echo err >&2"])
        assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")
        # more than a pipe holds, both ways: written and read as the pipes allow
        big = "x" * 1_000_000
        assert (await run_command(["cat"], stdin=big)).stdout == big
        # a command that stops reading its input early: the rest is dropped, not an error
        assert (await run_command(["head", "-c", "3"], stdin=big)).stdout == "xxx"
        assert (await run_command(["sh", "-c", "exit 3"], check=False)).returncode == 3
        with pytest.raises(DriverError) as e:
            await run_command(["sh", "-c", "echo why >&2; exit 4"])
        assert "exit 4" in e.value.message and "why" in e.value.message
        with pytest.raises(FileNotFoundError):
            await run_command(["deckard-no-such-program"])

    run(main())


def test_a_timeout_or_a_cancel_kills_the_command_and_reaps_it(run: Runner) -> None:
    async def main() -> None:
        t0 = time.monotonic()
        with pytest.raises(DriverError) as e:
            await run_command(["sleep", "30"], timeout=0.3)
        assert e.value.code == "command_timeout" and "within 0.3 s" in e.value.message
        task = asyncio.create_task(run_command(["sleep", "30"]))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 5

    run(main())


def test_commands_run_side_by_side_and_the_loop_keeps_turning(run: Runner) -> None:
    async def main() -> None:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        t0 = time.monotonic()
        results = await asyncio.gather(*(run_command(["sh", "-c", f"sleep 0.3; echo {i}"]) for i in range(20)))
        elapsed = time.monotonic() - t0
        ticker.cancel()
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(20)]
        assert elapsed < 20 * 0.3, "the commands ran one after another"
        assert ticks >= 5, "the loop stood still while the commands ran"

    run(main())
