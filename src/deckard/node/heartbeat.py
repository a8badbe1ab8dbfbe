"""The node's heartbeat: written by a thread on its own connection, so the farm's own work cannot starve it.

Why a thread with a synchronous connection: the all-in-one process runs the API, the broker's relay and the node
on one event loop, and the heartbeat used to be one more task on it, queued on the shared pool.  With ten users
streaming and both CPUs busy, a loop turn came seconds late and one heartbeat took longer than the lease: the
node fenced itself and killed ten healthy desktops.  A thread gets the interpreter every switch interval
(5 ms) whatever the loop is doing, and its one connection (db/engine.py ``heartbeat_engine``) never waits for
a pool slot.  Measured (bench/soak.py, docs/benchmarks.md): with ten full-screen streams and every CPU busy the
writes take 1.6 ms at the median and a few hundred at worst, in the same minutes as the loop picks the thread's
reports up a quarter of a second late; with the process slowed further (tracemalloc on) the loop lagged 3.9 s
while the writes stayed under 0.3 s.  A loop that late is one GC pause or one synchronous hash away from the
lease, which is why the writer does not depend on it.  Every write and every lease read is bounded by
``heartbeat_timeout_s``, so the thread never hangs on a stalled database: after a failed write it asks the
database for our lease at once (readers are not blocked by a writer in WAL mode or by PostgreSQL's row locks).

The thread decides (node/fencing.py ``decide``) but does not act: killing guests needs the driver, which lives on
the loop.  It reports every beat to the loop; the report's arrival is also the proof that the loop turns, and a
thread that has not seen the loop for ``3 * lost_after_s`` stops writing: a wedged process must look dead.
Each write's duration is measured; one ``node.heartbeat_stats`` line a minute gives p50/p99/max and the loop lag.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
import structlog

from deckard.db.engine import heartbeat_engine
from deckard.node.fencing import Decision, LivenessFacts, decide
from deckard.node.host import read_host_figures
from deckard.runtime.metrics import HEARTBEAT_SECONDS
from deckard.runtime.settings import NodeSettings
from deckard.services.cluster import LeaseView, read_lease
from deckard.services.node_ops import write_heartbeat
from deckard.services.stats import percentile

log = structlog.get_logger()

STATS_EVERY_S = 60.0


@dataclass(frozen=True)
class Beat:
    """One heartbeat attempt, as the thread hands it to the loop."""

    decision: Decision
    accepted: bool  # the database took the write and our row is live
    write_ms: float
    error: str = ""
    registration: int = 0  # which registration of the node the write was for (see ``Heartbeat.renewed``)
    sent_at: float = field(default_factory=time.monotonic)


@dataclass
class _Window:
    """Figures of the current minute: every write attempt's duration, failures, loop lag (list.append is atomic)."""

    writes_ms: list[float] = field(default_factory=list)
    failed: int = 0
    lag_ms: list[float] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)

    def summary(self) -> dict[str, object]:
        p = {f"p{q}_ms": round(v, 1) for q in (50, 99) if (v := percentile(self.writes_ms, q)) is not None}
        return {
            "writes": len(self.writes_ms),
            "failed": self.failed,
            **p,
            "max_ms": round(max(self.writes_ms, default=0.0), 1),
            "loop_lag_max_ms": round(max(self.lag_ms, default=0.0), 1),
        }


class Heartbeat:
    """Writes this node's heartbeat every ``heartbeat_s`` from a thread; ``run`` hands each verdict to the loop."""

    def __init__(self, url: str, node_id: int, cfg: NodeSettings) -> None:
        self.url = url
        self.node_id = node_id
        self.cfg = cfg
        now = time.monotonic()
        self.ok_at = now  # start of the last write the database accepted
        self.ok_since = now  # start of the current run of accepted writes
        self.running = 0  # guests running, refreshed by the loop (the driver lives there)
        self._loop_seen = now
        self._peers = 0  # nodes that could take over, as the last answer of the database counted them
        self._halt = threading.Event()
        self._window = _Window()
        self.registration = 0

    def renewed(self) -> None:
        """The node (re-)registered: its row carries a fresh heartbeat, and a new run of them starts.

        Beats written before are stale: a ``lost`` verdict about the old row must not kill the new one's guests.
        """
        self.registration += 1
        self.ok_at = self.ok_since = time.monotonic()

    def healthy_for(self) -> float:
        """Seconds of uninterrupted accepted heartbeats (0 when the last one is overdue)."""
        now = time.monotonic()
        return now - self.ok_since if now - self.ok_at < self.cfg.heartbeat_s * 2 + 1 else 0.0

    async def run(
        self,
        stop: asyncio.Event,
        count_running: Callable[[], Awaitable[int]],
        on_beat: Callable[[Beat], Awaitable[None]],
    ) -> None:
        """Run the thread until ``stop``; act (``on_beat``) on the newest beat, keep ``running`` fresh."""
        loop = asyncio.get_running_loop()
        beats: asyncio.Queue[Beat] = asyncio.Queue()

        def arrived(beat: Beat) -> None:
            self._loop_seen = time.monotonic()
            self._window.lag_ms.append((self._loop_seen - beat.sent_at) * 1000)
            beats.put_nowait(beat)

        thread = threading.Thread(target=self._write_until_halted, args=(loop, arrived), name="heartbeat")
        thread.start()
        try:
            while not stop.is_set():
                try:
                    self.running = await count_running()
                except Exception as e:  # the figure is informative; the heartbeat goes on without it
                    log.warning("node.count_guests_failed", error=str(e))
                try:
                    beat = await asyncio.wait_for(beats.get(), self.cfg.heartbeat_s)
                except TimeoutError:
                    continue
                while not beats.empty():  # act on the newest verdict only
                    beat = beats.get_nowait()
                if beat.registration == self.registration:
                    await on_beat(beat)
        finally:
            self._halt.set()
            await asyncio.to_thread(thread.join)

    # ---- the thread --------------------------------------------------------------------------------------
    def _write_until_halted(self, loop: asyncio.AbstractEventLoop, arrived: Callable[[Beat], None]) -> None:
        engine = heartbeat_engine(self.url, self.cfg.heartbeat_timeout_s)
        try:
            while not self._halt.is_set():
                beat = self.beat_once(engine)
                try:
                    loop.call_soon_threadsafe(arrived, beat)
                except RuntimeError:  # the loop is closed: the process is ending
                    return
                self._log_window()
                self._halt.wait(self.cfg.heartbeat_s if beat.accepted else min(self.cfg.heartbeat_s, 0.5))
        finally:
            engine.dispose()

    def beat_once(self, engine: sa.Engine) -> Beat:
        """One write (and, when it fails, one read of our lease), then the decision on what the database said."""
        t0 = time.monotonic()
        registration = self.registration
        view: LeaseView | None = None
        accepted, error = False, ""
        if t0 - self._loop_seen > 3 * self.cfg.lost_after_s:
            error = f"the event loop has not turned for {t0 - self._loop_seen:.0f} s: no heartbeat for a wedged node"
        else:
            try:
                h = read_host_figures()
                with engine.begin() as conn:
                    live = write_heartbeat(
                        conn, self.node_id, mem_free_mib=h.mem_free_mib, load=h.load, running=self.running
                    )
                    view = read_lease(conn, self.node_id, self.cfg.lost_after_s)
                accepted = live
            except Exception as e:  # a stalled or unreachable database: ask it for our lease below
                error = str(e).splitlines()[0] if str(e) else type(e).__name__
        write_ms = (time.monotonic() - t0) * 1000
        self._window.writes_ms.append(write_ms)  # failed attempts too: how long the database kept us waiting
        HEARTBEAT_SECONDS.labels(self.cfg.name).observe(write_ms / 1000)
        if accepted:
            if t0 - self.ok_at > self.cfg.heartbeat_s * 2 + 1:
                self.ok_since = t0
            self.ok_at = t0
        else:
            self._window.failed += 1
            if error:
                log.warning("node.heartbeat_failed", node_id=self.node_id, error=error, ms=round(write_ms))
        if view is None:
            try:
                with engine.connect() as conn:
                    view = read_lease(conn, self.node_id, self.cfg.lost_after_s)
            except Exception:  # the database does not answer at all: decide() counts instead
                view = None
        if view is not None:
            self._peers = view.peers
        facts = LivenessFacts(
            since_ok_s=time.monotonic() - self.ok_at,
            view=view,
            peers_known=self._peers,
            self_fence_after_s=self.cfg.self_fence_after_s,
        )
        return Beat(decide(facts), accepted, write_ms, error, registration=registration)

    def _log_window(self) -> None:
        if time.monotonic() - self._window.since < STATS_EVERY_S:
            return
        window, self._window = self._window, _Window()
        log.info("node.heartbeat_stats", node_id=self.node_id, **window.summary())
