"""The life of a long-running Deckard process (``deckard up``, ``deckard node``, ``deckard api``): signals, the
event loop, the orderly drain of its parts, and restart in place.

Why here and not in the commands: which parts run (the API, a node daemon, a broker) is the command's choice;
how a process starts, stops and re-executes itself is the same for all of them, like uvicorn's ``server.py``.
The rules:

- SIGTERM or SIGINT sets ``Shutdown.stop``: every part finishes what it is doing and returns.
- SIGHUP, in a restartable process, sets ``restart`` too (a part may also ask for it, as the node daemon does
  for ``cmd='restart'``).  Once everything has stopped, the process re-executes itself with the same pid and
  process group, so pid files and fencing stay valid and the new code (if it was upgraded) runs.
- The event loop is uvloop's when it is installed, asyncio's otherwise; the choice is made once, before the
  loop runs, so a failure inside the process never runs it a second time on the other loop.
- ``Parts`` drains in order: ``stop`` is set, the fronts close (the broker: no new connections), the tasks
  still running finish, and only then do the resources the caller opened around it (the database) close.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import structlog

log = structlog.get_logger("deckard.runtime")
T = TypeVar("T")


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop when it is installed (faster sockets for the broker's byte relay), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on :func:`event_loop_factory`'s loop: a client's work too (``deckard connect``, the
    benchmarks' clients) has uvloop's quicker sockets and TLS."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(coro)


@dataclass
class Shutdown:
    """What the process was asked to do: ``stop`` is set by every ending, ``restart`` too when it re-executes."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    restart: asyncio.Event = field(default_factory=asyncio.Event)

    def request_restart(self) -> None:
        self.restart.set()
        self.stop.set()


def run_process(main: Callable[[Shutdown], Awaitable[None]], *, restart_argv: Sequence[str] | None = None) -> None:
    """Run ``main`` until it returns, stopping it on SIGTERM/SIGINT.

    With ``restart_argv`` the process is restartable: SIGHUP (or ``main`` setting ``restart``) stops it and then
    replaces it with ``restart_argv`` (``os.execv``); without it SIGHUP keeps its default action.
    """

    async def supervise(shutdown: Shutdown) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, shutdown.stop.set)
        if restart_argv is not None:
            loop.add_signal_handler(signal.SIGHUP, shutdown.request_restart)
        await main(shutdown)

    shutdown = Shutdown()
    run(supervise(shutdown))
    if restart_argv is not None and shutdown.restart.is_set():
        reexec(restart_argv)


def freeze_heap() -> None:
    """Once a long-running process has started: collect, then hide what is left from the cyclic collector.

    What is alive then (~200,000 objects in ``deckard up``: the modules, the API's routes, the database's tables)
    lives as long as the process, yet every full collection walked all of it: 90-160 ms on the build machine with
    the event loop stopped (a connect, the node's start work and every tunnel waiting behind it), whenever the
    objects made since had grown by a quarter.  Frozen (``gc.freeze``), they are still freed when their last
    reference goes, and what is made afterwards is collected as before.
    """
    gc.collect()
    gc.freeze()


def reexec(argv: Sequence[str]) -> None:
    """Replace this process with ``argv`` (same pid and process group); output written so far is flushed first."""
    log.info("process.reexec", argv=list(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], list(argv))


class Parts:
    """The long-running parts of one process: tasks that run until ``stop``, and fronts closed before they end.

    ``async with Parts(stop) as parts``: ``parts.run(...)`` starts a task, ``parts.on_stop(...)`` registers a
    close (run newest first), ``await parts.wait()`` returns when every task has ended and raises the first
    failure.  Leaving the block, normally or not, drains everything in the order of the module docstring.
    """

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def run(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    def on_stop(self, close: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(close)

    async def wait(self) -> None:
        if not self._tasks:
            return
        done, _pending = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if (error := task.exception()) is not None:
                raise error

    async def until(self, event: asyncio.Event, timeout: float) -> None:
        """Wait for ``event`` (TimeoutError after ``timeout``); a part that fails meanwhile raises its error at once."""
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait([waiter, *self._tasks], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        for task in self._tasks:
            if task.done() and not task.cancelled() and (error := task.exception()) is not None:
                raise error
        if not event.is_set():
            raise TimeoutError

    async def __aenter__(self) -> Parts:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop.set()
        for close in reversed(self._closers):
            await close()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def pid_alive(pid: int) -> bool:
    """The process exists and is neither a zombie nor dead (``/proc/<pid>/stat``'s state)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
