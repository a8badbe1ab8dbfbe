"""How a Deckard process runs, drains and restarts in place (runtime/process.py), with real signals and exec."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from deckard.runtime.process import Parts, Shutdown, run_process


async def test_leaving_early_drains_fronts_newest_first_then_tasks_then_what_encloses_them() -> None:
    """As when the node never becomes ready: the block is left while its parts still run."""
    stop = asyncio.Event()
    order: list[str] = []

    async def part(name: str) -> None:
        await stop.wait()
        await asyncio.sleep(0.01)
        order.append(f"{name} ended")

    async def close(name: str) -> None:
        order.append(f"{name} closed")

    with pytest.raises(TimeoutError):
        try:
            async with Parts(stop) as parts:
                parts.run("api", part("api"))
                parts.on_stop(lambda: close("first front"))
                parts.on_stop(lambda: close("second front"))
                raise TimeoutError("the node did not become ready")
        finally:
            order.append("database closed")
    assert stop.is_set()
    assert order == ["second front closed", "first front closed", "api ended", "database closed"]


async def test_a_failing_part_stops_the_others_and_its_error_comes_out() -> None:
    stop = asyncio.Event()
    survivor_saw_stop = asyncio.Event()

    async def survivor() -> None:
        await stop.wait()
        survivor_saw_stop.set()

    async def failing() -> None:
        raise RuntimeError("the port is taken")

    with pytest.raises(RuntimeError, match="the port is taken"):
        async with Parts(stop) as parts:
            parts.run("api", survivor())
            parts.run("node", failing())
            await parts.wait()
    assert survivor_saw_stop.is_set()


def test_sigterm_stops_the_process_and_main_runs_once_even_when_it_raises_import_error() -> None:
    runs: list[bool] = []

    async def main(shutdown: Shutdown) -> None:
        runs.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(shutdown.stop.wait(), 5)
        assert not shutdown.restart.is_set()
        raise ImportError("a missing optional module inside the farm")

    with pytest.raises(ImportError):
        run_process(main)
    assert runs == [True], "the farm ran a second time on another event loop"


def test_sighup_restarts_a_restartable_process_in_place_with_the_same_pid() -> None:
    script = textwrap.dedent(
        """
        import asyncio, os, signal, sys
        from deckard.runtime.process import run_process

        async def main(shutdown):
            print("first", os.getpid(), flush=True)
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.wait_for(shutdown.stop.wait(), 5)

        run_process(main, restart_argv=[sys.executable, "-c", "import os; print('again', os.getpid())"])
        print("not re-executed")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    said = [line.split() for line in out.stdout.splitlines() if line.startswith(("first", "again", "not"))]
    assert said == [["first", said[0][1]], ["again", said[0][1]]], out.stdout + out.stderr
