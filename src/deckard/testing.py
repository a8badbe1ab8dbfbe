"""Test and benchmark helpers shipped with the package: run a real all-in-one farm in a subprocess.

``FarmProcess`` starts ``deckard up`` with its own home, ports, bridge and desktop network, so tests and
benchmarks never collide with a farm already on the machine, and ``close()`` removes every container, bridge
and file the farm made, even after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deckard.runtime.machines import Machine, Machines
from deckard.runtime.paths import FarmPaths

if TYPE_CHECKING:
    from deckard.db.engine import Database
    from deckard.drivers.fake import FakeDriver
    from deckard.node.daemon import NodeDaemon
    from deckard.runtime.settings import Settings

REPO = Path(__file__).resolve().parents[2]


# ---- the browser the web tests and benchmarks drive (Debian's Chromium through Playwright) ----------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WEB_DIST = REPO / "src" / "deckard" / "web" / "static" / "dist"


def browser_unavailable_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return "Debian's Chromium is not installed (apt-get install chromium; `make test` does it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install -e '.[dev]'; `make` does it)"
    if not (WEB_DIST / "portal.js").exists() or not (WEB_DIST / "admin.js").exists():
        return "the web assets are not built (cd web && npm ci && npm run build; `make` does it)"
    return None


# a page of ours whose module script has not run within this long is loaded again: Chromium drops a request in
# flight when the machine's addresses change (ERR_NETWORK_CHANGED), and another test's farm making a bridge or a
# veth then leaves a page without its script (a login form that submits itself as a GET)
SCRIPT_READY_S = 10.0
UNREADY = "() => !!document.querySelector('script[type=module]') && !document.documentElement.dataset.ready"
READY = "() => document.documentElement.dataset.ready"


def _load_again(e: Exception, attempt: int) -> bool:
    """Whether a failed load is worth another try: the network changed under it, or its script never ran."""
    return attempt < 2 and ("ERR_NETWORK_CHANGED" in str(e) or "Timeout" in str(e))


def goto(page: Any, url: str) -> None:
    """``page.goto`` that rides out Chromium's ERR_NETWORK_CHANGED (a farm's bridge or veth came or went), for the
    page and for its module script (``document.documentElement.dataset.ready``, set by ours once they ran)."""
    for attempt in range(3):
        try:
            page.goto(url)
            if not page.evaluate(UNREADY):
                return
            page.wait_for_function(READY, timeout=SCRIPT_READY_S * 1000)
            return
        except Exception as e:
            if not _load_again(e, attempt):
                raise
            page.wait_for_timeout(200)


async def agoto(page: Any, url: str) -> None:
    """:func:`goto` for Playwright's async API."""
    for attempt in range(3):
        try:
            await page.goto(url)
            if not await page.evaluate(UNREADY):
                return
            await page.wait_for_function(READY, timeout=SCRIPT_READY_S * 1000)
            return
        except Exception as e:
            if not _load_again(e, attempt):
                raise
            await page.wait_for_timeout(200)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_cache() -> Path:
    """The tests' image layer cache: one per machine, so a second clone (CI's) neither builds nor downloads again."""
    return Path(os.environ.get("DECKARD_IMAGE_CACHE", "/var/cache/deckard/images"))


def e2e_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run LXC containers"
    if not shutil.which("lxc-start"):
        return "LXC is not installed (apt-get install lxc; `make test` does it)"
    if not shutil.which("debootstrap"):
        return "debootstrap is not installed (`make test` installs it)"
    return None


_FARMS_OF_THIS_PROCESS = itertools.count()


def free_network(second: int, seed: int) -> str:
    """A ``10.<second>.x.0/24`` that no interface of this machine routes yet, starting at ``x = seed % 250``: a
    farm left behind by a killed run (or another process's) must not make this one's desktops unreachable."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    start = seed % 250
    for x in (*range(start, 250), *range(start)):
        if f"10.{second}.{x}." not in routes:
            return f"10.{second}.{x}.0/24"
    raise RuntimeError(f"no free 10.{second}.x.0/24 network on this machine")


@dataclass
class FarmProcess:
    """A farm under a temporary home, driven through its own CLI like a user would."""

    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="deckard-farm-")))
    api_port: int = field(default_factory=free_port)
    broker_port: int = field(default_factory=free_port)
    bridge: str = ""  # default: dke<pid>, and a suffix for each further farm of this process (see __post_init__)
    network: str = ""  # default: 10.214.<pid>.0/24, then 10.212.<pid>.0/24, 10.211.… for further farms
    extra_env: dict[str, str] = field(default_factory=dict)
    nodes: int = 1  # `deckard up --nodes N`: the all-in-one process plus nodes 2..N (own run dirs and brokers)
    machines: int = 0  # `deckard up --machines N`: API here, node i in machine i (runtime/machines.py)
    up_output: str = ""

    def __post_init__(self) -> None:
        # a process may run two farms at once (a test session's shared farm and a module's own): each gets its
        # own bridge and /24; 10.213.x belongs to the container driver's tests, 10.216.x to Upstream
        n = next(_FARMS_OF_THIS_PROCESS)
        pid = os.getpid()
        self.bridge = self.bridge or f"dke{pid % 100000}" + (f"x{n}" if n else "")
        self.network = self.network or free_network(214 if n == 0 else 212 - (n - 1) % 8, pid)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "DECKARD_HOME": str(self.home),
                "DECKARD_PROFILE": str(self.home / "cli-profile.json"),
                "DECKARD_IMAGE_CACHE": str(image_cache()),
                "DECKARD_CA": str(self.home / "tls" / "ca.pem"),
                "NO_COLOR": "1",
                "COLUMNS": "200",
            }
        )
        # `deckard up` builds the standard desktop by default; test and benchmark farms run the minimal one
        # (smaller to unpack, lighter desktops) unless told otherwise; tests of the standard desktop import it
        env.setdefault("DECKARD_IMAGE_PROFILE", "minimal")
        env.setdefault("DECKARD_BROKER__TLS_KEY", "ec256")  # RSA 3072 keys take seconds to make (runtime/tls.py)
        env.update(self.extra_env)
        return env

    @property
    def ca(self) -> Path:
        return self.home / "tls" / "ca.pem"

    @property
    def broker(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def sqlite_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.home / 'deckard.db'}"

    def deckard(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """``python -m deckard.cli.main *args`` in a process of its own, forked from one that imported the CLI
        already (``testing_cli.py``: 0.1 s a command instead of 0.6 s)."""
        from deckard.testing_cli import run_cli

        proc = run_cli(list(args), self.env, input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"deckard {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def up(self) -> str:
        proc = self.deckard(
            "up",
            "--home",
            str(self.home),
            "--api-port",
            str(self.api_port),
            "--broker-port",
            str(self.broker_port),
            "--listen",
            "127.0.0.1",
            "--bridge",
            self.bridge,
            "--network",
            self.network,
            "--node-name",
            self.node_name(1),
            "--nodes",
            str(self.nodes),
            *(["--machines", str(self.machines)] if self.machines else []),
        )
        self.up_output = proc.stdout + proc.stderr
        return self.up_output

    def node_name(self, index: int) -> str:
        """Name of node ``index`` (1 is the all-in-one process); its broker listens on broker_port + index - 1."""
        return f"node-{self.home.name}" + (f"-{index}" if index > 1 else "")

    def machine_node(self, index: int) -> str:
        """Name of the node in machine ``index`` (from 1) of a farm across machines."""
        return f"{self.node_name(1)}-m{index}"

    def node_paths(self) -> list[FarmPaths]:
        """Each node's view of the farm home (extra nodes have their own run directory, so their own guests)."""
        paths = FarmPaths(self.home)
        if self.machines:
            return [paths.demo_node(i) for i in range(1, self.machines + 1)]
        return [paths, *(paths.demo_node(i) for i in range(2, self.nodes + 1))]

    def machine(self, index: int) -> Machine:
        """Machine ``index`` (from 1) of a farm across machines."""
        tag, count = (self.home / "run" / "machines").read_text().split()
        return Machines.existing(tag, int(count)).machines[index - 1]

    def guest_of(self, desktop_id: int) -> tuple[Path, str]:
        """The LXC directory and name of the desktop's guest, on whichever node runs it."""
        return self._guest(desktop_id)[1:]

    def _guest(self, desktop_id: int) -> tuple[list[str], Path, str]:
        """As guest_of, with the prefix that runs a command beside it (in its machine, for a farm across machines:
        LXC's tools reach a guest through sockets of the machine's network namespace)."""
        node = None
        if self.machines:  # the machine the farm says runs it (a lost machine keeps its guests' directories)
            rows: Any = self.json("desktop", "list")
            node = next(r["node"] for r in rows if r["id"] == desktop_id)
        warm = self._warm_guest(desktop_id)
        for i, paths in enumerate(self.node_paths(), start=1):
            name = warm or paths.guest_name(desktop_id)
            here = node == self.machine_node(i) if node else (paths.lxc / name).exists()
            if here:
                prefix = ["nsenter", f"--net=/run/netns/{self.machine(i).name}"] if self.machines else []
                return prefix, paths.lxc, name
        paths = self.node_paths()[0]
        return [], paths.lxc, warm or paths.guest_name(desktop_id)

    def _warm_guest(self, desktop_id: int) -> str | None:
        """The warm guest the desktop took over (``desktops.guest``), read from a SQLite farm's database."""
        path = Path(self.sqlite_url.split("///", 1)[-1])
        if not path.is_file():
            return None
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as conn:
            row = conn.execute("SELECT guest FROM desktops WHERE id = ?", (desktop_id,)).fetchone()
        return str(row[0]) if row and row[0] else None

    def pid(self) -> int | None:
        try:
            return int((self.home / "run" / "deckard-up.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def json(self, *args: str) -> object:
        return json.loads(self.deckard(*args, "--json").stdout)

    def desktop(self, name: str) -> dict[str, Any]:
        """The desktop's row as `deckard desktop list --json` shows it."""
        rows = self.json("desktop", "list")
        assert isinstance(rows, list)
        return next(r for r in rows if r["name"] == name)

    def user_with_desktop(self, login: str, password: str, desktop: str, *options: str) -> dict[str, Any]:
        """A new user and a desktop of theirs (``options``: more ``desktop add`` options); the desktop's row."""
        self.deckard("user", "add", login, "--password", password)
        self.deckard("desktop", "add", desktop, "--user", login, *options)
        return self.desktop(desktop)

    def guests(self, lxc: Path | None = None) -> list[str]:
        """Guests LXC knows in one node's directory (default: the all-in-one node's)."""
        lxc = lxc or self.home / "run" / "lxc"
        if not lxc.exists():
            return []
        out = subprocess.run(["lxc-ls", "-P", str(lxc), "-1"], capture_output=True, text=True)
        return [n for n in out.stdout.split() if n]

    def attach(self, desktop_id: int, command: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside a desktop (root, or as ``user``) with lxc-attach.  Root entered this way has
        the configuration's capabilities, the mounter's too (drivers/lxc_config.py): to see what root in a desktop
        can do, run as the agent runs processes (its ``exec``), as tests/e2e/test_container_driver.py does."""
        prefix, lxc, name = self._guest(desktop_id)
        cmd = [*prefix, "lxc-attach", "-n", name, "-P", str(lxc), "--clear-env", "--"]
        cmd += ["su", "-", user, "-c", command] if user else ["sh", "-c", command]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)

    def probe(self, desktop_id: int, host: str, port: int) -> str:
        """From inside the desktop: 'open', or 'blocked <why>' for a TCP connection that fails within 2 s."""
        code = (
            "import socket\n"
            f"try: socket.create_connection(('{host}', {port}), 2); print('open')\n"
            "except OSError as e: print('blocked', e)\n"
        )
        out = self.attach(desktop_id, f'python3 -c "{code}"')
        return out.stdout.strip() or out.stderr.strip()

    def diagnostics(self, desktop_id: int | None = None, lines: int = 40) -> str:
        """The tail of the farm's log and, for a desktop, of its agent, Xvnc and session logs (for failures)."""
        parts = []
        log_file = self.home / "logs" / "deckard.log"
        if log_file.exists():
            parts.append("--- deckard.log\n" + "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:]))
        if desktop_id is not None:
            lxc, name = self.guest_of(desktop_id)
            console = lxc / name / "console.log"
            if console.exists():  # the agent (PID 1) logs to the console
                tail = console.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- agent console (desktop {desktop_id})\n" + "\n".join(tail))
            for name in ("xvnc.log", "nxagent.log", "session.log"):
                out = self.attach(desktop_id, f"tail -n {lines} /run/deckard/{name} 2>&1")
                parts.append(f"--- {name} (desktop {desktop_id})\n{out.stdout}{out.stderr}")
            out = self.attach(desktop_id, GUEST_PROCESSES)  # a display without its windows: which programs run
            parts.append(f"--- processes (desktop {desktop_id})\n{out.stdout}{out.stderr}")
        return "\n".join(parts)

    def log_excerpt(self, lines: int = 25) -> str:
        """Every process log of the farm (the all-in-one's and each extra node's): its warnings and errors, then its
        last lines, for a failed test's report (tests/conftest.py), before ``close`` removes them."""
        parts = []
        for log_file in sorted((self.home / "logs").glob("*.log")):
            # a test's polls (API requests) and the heartbeat's minute lines say nothing about a failure
            text = [
                line
                for line in log_file.read_text(errors="replace").splitlines()
                if '"api.request"' not in line and '"node.heartbeat_stats"' not in line
            ]
            loud = [
                line
                for line in text
                if '"level": "warning"' in line
                or '"level": "error"' in line
                or "[warning" in line
                or "[error" in line
                or "Traceback" in line
            ]
            parts.append(f"--- {log_file.name}: warnings and errors (last {lines})\n" + "\n".join(loud[-lines:]))
            parts.append(f"--- {log_file.name}: last {lines} lines\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)

    def close(self) -> None:
        """Stop the farm and remove everything it made, whatever state it is in."""
        try:
            self.deckard("down", "--home", str(self.home), "--timeout", "30", check=False, timeout=60)
        except subprocess.TimeoutExpired:
            pass
        pid = self.pid()
        if pid:
            try:
                os.killpg(pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
        import asyncio

        from deckard.drivers import firewall, tenant_net
        from deckard.drivers.cgroups import remove_cgroups
        from deckard.drivers.network import delete_link, remove_bridge, veth_name

        guests = [(paths.lxc, name) for paths in self.node_paths() for name in self.guests(paths.lxc)]
        for lxc, name in guests:
            subprocess.run(["lxc-stop", "-k", "-n", name, "-P", str(lxc)], capture_output=True)
        kill_processes_mentioning(str(self.home))  # extra nodes, even one whose pid file is gone
        for _lxc, name in guests:
            remove_cgroups(name)
            asyncio.run(delete_link(veth_name(name)))
        for paths in self.node_paths():  # VMs: the taps and their guards (QEMU died with the processes above)
            asyncio.run(remove_vm_ports("t" + paths.guest_prefix().replace("-", "")))
        asyncio.run(tenant_net.remove_farm(self.bridge))
        asyncio.run(remove_bridge(self.bridge))
        asyncio.run(firewall.remove(self.bridge))
        shutil.rmtree(self.home, ignore_errors=True)


async def remove_vm_ports(prefix: str) -> None:
    """Delete the taps named ``prefix*`` and their bridge guards (``drivers/vm.py``, ``firewall.guard_port``)."""
    from deckard.drivers import firewall
    from deckard.drivers.network import delete_link

    for link in Path("/sys/class/net").glob(f"{prefix}*"):
        await delete_link(link.name)
        await firewall.remove_port_guard(link.name)


def wait_for(predicate: object, timeout: float, interval: float = 0.1, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()  # type: ignore[operator]
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# every process's command line in a desktop (its image has no ps), with its owner: for ``FarmProcess.attach``
GUEST_PROCESSES = "for p in /proc/[0-9]*; do echo \"$(stat -c %U $p) $(tr '\\0' ' ' < $p/cmdline)\"; done 2>/dev/null"


# ---- a farm of many nodes on one throwaway PostgreSQL (chaos tests, benchmarks, demos) -------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class PgCluster:
    """A throwaway PostgreSQL 15 cluster, restartable at will: run as the ``postgres`` user under root (PostgreSQL
    refuses root), as the calling user otherwise."""

    listen: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="deckard-pg-")))

    def _pg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # others run it as themselves
        return subprocess.run([*as_postgres, *args], check=check, capture_output=True)

    @property
    def data(self) -> Path:
        return self.base / "data"

    def init(self) -> PgCluster:
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        self._pg(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        with open(self.data / "pg_hba.conf", "a") as hba:  # nodes in network namespaces connect from afar
            hba.write("host all all 0.0.0.0/0 trust\n")
        self.start()
        return self

    def start(self) -> None:
        opts = (
            f"-h {self.listen} -p {self.port} -k {self.base} -c fsync=off -c full_page_writes=off "
            "-c max_connections=400 -c synchronous_commit=off"
        )
        log = str(self.base / "log")
        self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def url(self, database: str = "postgres", host: str | None = None) -> str:
        return f"postgresql+psycopg://postgres@{host or self.listen}:{self.port}/{database}"

    def socket_url(self, database: str) -> str:
        """The database through the cluster's socket in the host's files: how nodes in machines of this box
        (runtime/machines.py) reach it while it listens on loopback only."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.base}&port={self.port}"

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """A new database; a copy of ``template`` (an already migrated one) when given, which is ~10x faster."""
        import psycopg

        with psycopg.connect(f"postgresql://postgres@{self.listen}:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")
        # a session's cluster holds hundreds of test databases (gigabytes of small files): remove them in the
        # background rather than make the test run wait for the disk
        subprocess.Popen(["rm", "-rf", str(self.base)], start_new_session=True)


async def seed_farm(url: str, *, users: int = 1, desktops: int = 0, memory_mib: int = 64) -> list[int]:
    """Schema, default tenant/OSF/image (a fake one) and ``desktops`` desktops spread over ``users`` users."""
    import sqlalchemy as sa

    from deckard.db import schema as t
    from deckard.db.engine import Database
    from deckard.model.entities import utcnow
    from deckard.model.network import mac_for_ip
    from deckard.services.images import register_image
    from deckard.services.tenancy import bootstrap_farm

    db = Database(url)
    await db.start()
    try:
        await bootstrap_farm(db)
        await register_image(db, Path("/nonexistent/fake-image.tar"), version="fake-1")
        async with db.begin() as conn:
            tenant_id = (await conn.execute(sa.select(t.tenants.c.id).limit(1))).scalar_one()
            osf_id = (await conn.execute(sa.select(t.osfs.c.id).limit(1))).scalar_one()
            await conn.execute(sa.update(t.osfs).values(memory_mib=memory_mib))
            now = utcnow()
            user_ids = []
            for u in range(users):
                res = await conn.execute(
                    sa.insert(t.users)
                    .values(tenant_id=tenant_id, login=f"u{u}", created_at=now)
                    .returning(t.users.c.id)
                )
                user_ids.append(int(res.scalar_one()))
            rows = []
            for k in range(desktops):
                ip = f"127.{100 + k // 65536}.{(k // 256) % 256}.{k % 256}"  # loopback: the fake driver binds it
                rows.append(
                    dict(
                        tenant_id=tenant_id,
                        name=f"d{k}",
                        user_id=user_ids[k % users],
                        osf_id=osf_id,
                        ip=ip,
                        mac=mac_for_ip(ip),
                        created_at=now,
                    )
                )
            for i in range(0, len(rows), 2000):
                await conn.execute(sa.insert(t.desktops), rows[i : i + 2000])
            ids = [int(r.id) for r in await conn.execute(sa.select(t.desktops.c.id).order_by(t.desktops.c.id))]
        return ids
    finally:
        await db.close()


@dataclass
class NodeProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    run_dir: Path


@dataclass
class MultiNodeFarm:
    """N ``deckard node --driver fake`` processes on one PostgreSQL and one storage root (the farm home).

    Each node has its own name, run directory and broker port, and its own process group so ``kill -9`` of
    the group is what a crash looks like.  ``prefix`` (a command such as ``nsenter --net=…``) runs a node
    inside a network namespace the caller created.
    """

    database_url: str
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="deckard-nodes-")))
    lost_after: float = 10.0
    nodes: dict[str, NodeProcess] = field(default_factory=dict)

    def start_node(
        self,
        name: str,
        *,
        prefix: list[str] | None = None,
        database_url: str | None = None,
        fake_start_delay: float = 0.0,
        extra_env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ) -> NodeProcess:
        run_dir = self.home / "nodes" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        log = self.home / f"{name}.log"
        args = [*(prefix or []), sys.executable, "-m", "deckard.cli.main", "node", "--home", str(self.home)]
        args += ["--node-name", name, "--driver", "fake", "--run-dir", str(run_dir)]
        args += ["--database", database_url or self.database_url, "--broker-port", str(free_port())]
        args += ["--listen", "127.0.0.1", "--lost-after", str(self.lost_after)]
        if fake_start_delay:
            args += ["--fake-start-delay", str(fake_start_delay)]
        args += extra_args or []
        env = dict(os.environ, DECKARD_LOG_FORMAT="json", **(extra_env or {}))
        env.setdefault("DECKARD_BROKER__TLS_KEY", "ec256")  # RSA 3072 keys take seconds to make (runtime/tls.py)
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                args, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True, env=env
            )
        node = NodeProcess(name, proc, log, run_dir)
        self.nodes[name] = node
        return node

    def kill(self, name: str) -> None:
        """``kill -9`` the node's whole process group: a crash, not a shutdown."""
        proc = self.nodes[name].proc
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

    def close(self) -> None:
        for node in self.nodes.values():
            if node.proc.poll() is None:
                try:
                    os.killpg(node.proc.pid, 15)
                    node.proc.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    with_kill = node.proc.pid
                    try:
                        os.killpg(with_kill, 9)
                    except ProcessLookupError:
                        pass
        kill_processes_mentioning(str(self.home))
        shutil.rmtree(self.home, ignore_errors=True)


@dataclass
class InProcessNode:
    """A real ``NodeDaemon`` with the fake driver, run as a task of the caller's event loop (no root, no process).

    Its intervals are short so that tests see pings, zombies and stops within a second.  ``stop(restart=True)``
    is a restart in place: the daemon hands its guests over through the driver, and ``start`` again runs a new
    daemon that adopts them.  ``driver`` is where a test injects faults (drivers/fake.py).
    """

    db: Database
    settings: Settings
    driver: FakeDriver
    daemon: NodeDaemon | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    @classmethod
    def fake(cls, db: Database, network: str, **node: Any) -> InProcessNode:
        """A node named ``node-<pid>`` for desktops on ``network`` (in 127.0.0.0/8); ``node`` overrides settings."""
        from deckard.drivers.fake import FakeDriver
        from deckard.runtime.settings import NetworkSettings, NodeSettings, Settings

        fast = dict(heartbeat_s=0.5, poll_s=0.05, agent_check_s=0.2, agent_failures=2, start_timeout=5.0)
        settings = Settings(
            home=Path(tempfile.mkdtemp(prefix="deckard-node-")),
            database_url=db.url,
            network=NetworkSettings(range=network),
            node=NodeSettings(**{"name": f"node-{os.getpid()}", "driver": "fake", **fast, **node}),
        )
        return cls(db, settings, FakeDriver(settings.paths))

    async def start(self) -> int:
        """Run a new daemon on this node's driver until it is ready; its node id."""
        from deckard.node.daemon import NodeDaemon

        self.daemon = NodeDaemon(self.db, self.settings, self.driver, restart=asyncio.Event())
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.daemon.run(self._stop), name="node")
        ready = asyncio.create_task(self.daemon.ready.wait())
        await asyncio.wait([ready, self._task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            await self._task  # raises what stopped the daemon
            raise TimeoutError("the node daemon did not become ready within 30 s")
        assert self.daemon.node_id is not None
        return self.daemon.node_id

    async def stop(self, *, restart: bool = False) -> None:
        """Stop the daemon: every desktop stops, or with ``restart`` they stay for the next daemon."""
        if self._task is None or self.daemon is None:
            return
        if restart:
            self.daemon.restart.set()
        self._stop.set()
        task, self._task = self._task, None
        await task

    async def close(self) -> None:
        await self.stop()
        await self.driver.close()  # guests a test left behind end here (their hand-over goes with the home)
        shutil.rmtree(self.settings.home, ignore_errors=True)


def kill_processes_mentioning(marker: str) -> None:
    """SIGKILL every process whose command line names ``marker`` (a farm home): nothing a test started survives it,
    not even a node left in a deleted network namespace."""
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), 9)
        except (OSError, ProcessLookupError):
            continue


# ---- an "internet" for desktops: a network namespace with a web server and a DNS zone ----------------------


@dataclass
class Upstream:
    """A network namespace behind a veth pair from the host, serving HTTP (ports 8080 and 8081) and a DNS zone.

    A desktop's egress is tested against it and nothing else: no packet leaves this machine.  The host side gets
    ``host_ip``; the namespace ``ip`` answers ``*.{zone}`` and serves ``root`` (an ``index.html`` and whatever a
    test puts there).  ``close()`` removes the namespace, the veth pair and every process, even after a failure.
    """

    name: str = field(default_factory=lambda: f"dkup{os.getpid() % 100000}")
    subnet: str = field(default_factory=lambda: f"10.216.{os.getpid() % 250}")
    zone: str = "upstream.test"
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="deckard-upstream-")))
    page: str = "<html><body style='background:#1f7a3a'><h1>Deckard upstream page</h1></body></html>"
    ports: tuple[int, ...] = (8080, 8081)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def host_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def ip(self) -> str:
        return f"{self.subnet}.2"

    def _ns(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def start(self) -> Upstream:
        host_if, ns_if = f"{self.name}h", f"{self.name}n"
        for cmd in (
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
            ["ip", "link", "set", ns_if, "netns", self.name],
            ["ip", "addr", "add", f"{self.host_ip}/24", "dev", host_if],
            ["ip", "link", "set", host_if, "up"],
            ["ip", "-n", self.name, "addr", "add", f"{self.ip}/24", "dev", ns_if],
            ["ip", "-n", self.name, "link", "set", ns_if, "up"],
            ["ip", "-n", self.name, "link", "set", "lo", "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        (self.root / "index.html").write_text(self.page)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        for port in self.ports:
            server = [sys.executable, "-m", "http.server", str(port), "--bind", self.ip, "--directory", str(self.root)]
            self._procs.append(subprocess.Popen(self._ns(*server), **quiet))  # type: ignore[call-overload]
        dns = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--listen-address={self.ip}",
            f"--address=/{self.zone}/{self.ip}",
            "--pid-file=",
            "--user=root",
        ]
        self._procs.append(subprocess.Popen(self._ns(*dns), **quiet))  # type: ignore[call-overload]
        for port in self.ports:
            wait_for(lambda port=port: _answers(self.ip, port), 10, 0.05, f"the upstream web server on {port}")
        return self

    def close(self) -> None:
        for proc in self._procs:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{self.name}h"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 0.5):
            return True
    except OSError:
        return False
