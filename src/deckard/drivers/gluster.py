"""GlusterFS as a farm's shared storage root: make a replica-3 volume from bricks, and mount it on a node.

Why GlusterFS (``docs/farm.md``, "Shared storage"): Debian packages it, the client is FUSE (this kind of machine
has no NFS and loads no kernel module), and a volume is three ``glusterd`` daemons with a brick directory each —
no monitors, metadata servers or object daemons to run, as CephFS needs.  A replica-3 volume keeps every file on
three storage machines; with quorum on, losing one leaves the other two serving reads and writes, and the
returning machine is healed by the self-heal daemon.

Everything here drives Debian's own tools — ``gluster --mode=script`` (the management CLI, talking to the local
``glusterd``) and ``mount -t glusterfs`` (``mount.glusterfs``, the FUSE client) — and turns their failures into
errors with stable codes that say what to do:

* ``gluster_missing`` / ``gluster_client_missing``: the package is not installed here;
* ``glusterd_down``: the CLI cannot reach the local ``glusterd``;
* ``brick_unreachable``: a storage machine does not answer (peer probe failed, or not connected in time);
* ``peer_in_other_pool``: a storage machine already belongs to another trusted pool;
* ``volume_exists``: a volume of that name exists with other bricks (the same bricks: the create is a no-op);
* ``brick_on_root`` / ``brick_in_use`` / ``bad_brick``: the brick cannot be used as given;
* ``storage_root_not_empty`` / ``storage_root_mounted`` / ``mount_failed``: the mount cannot go where asked.

``gluster`` runs as ``GlusterCli.command`` (default ``("gluster",)``); the tests prefix it with ``nsenter`` to
reach a storage machine made of namespaces on one box.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import structlog

from deckard.drivers.network import CommandResult, run_command
from deckard.model.errors import BadInput, Conflict, DriverError, Unavailable

log = structlog.get_logger()

REPLICA = 3
VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MOUNT_HELPER = Path("/sbin/mount.glusterfs")

# What a volume of desktop homes, images and disks gets on top of GlusterFS's defaults (docs/farm.md says why).
# A lost storage machine is noticed after network.ping-timeout (default 42 s: I/O would hang that long) or when
# TCP gives up on unacknowledged data (tcp-user-timeout) or on a silent peer (keepalive): 5 s each here, which a
# busy writer measured as a 9 s stall at most.  Quorum: a write needs 2 of the 3 bricks (quorum-type auto), and a
# storage machine cut off from its peers stops its own brick (server quorum), so two halves never both write.
# Not the whole `virt` group: it turns write-behind and the read caches off for QEMU's O_DIRECT disks, which
# would slow the homes' many small files down; its quorum and keepalive choices are the ones taken here.
VOLUME_OPTIONS: dict[str, str] = {
    "network.ping-timeout": "5",
    "client.tcp-user-timeout": "5",
    "server.tcp-user-timeout": "5",
    "client.keepalive-time": "5",
    "client.keepalive-interval": "1",
    "client.keepalive-count": "3",
    "server.keepalive-time": "5",
    "server.keepalive-interval": "1",
    "server.keepalive-count": "3",
    "cluster.quorum-type": "auto",
    "cluster.server-quorum-type": "server",
    "cluster.self-heal-daemon": "on",
}


@dataclass(frozen=True)
class Brick:
    """A directory on a storage machine that holds one copy of the volume: ``HOST:/absolute/path``."""

    host: str
    path: str

    @classmethod
    def parse(cls, text: str) -> Brick:
        host, sep, path = text.rpartition(":")
        if not sep or not host or not path.startswith("/") or any(c.isspace() for c in text):
            raise BadInput(
                f"bad brick {text!r}: give it as HOST:/absolute/path (a directory on a storage machine)",
                code="bad_brick",
            )
        return cls(host, path)

    def __str__(self) -> str:
        return f"{self.host}:{self.path}"


@dataclass
class VolumeReport:
    name: str
    bricks: list[str]
    created: bool  # False: it existed with these bricks already
    status: str
    options: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class VolumeHealth:
    name: str
    online: dict[str, bool]  # brick → its process runs
    nodes_reached: dict[str, list[str]]  # brick → the nodes connected to it
    nodes: list[str]  # every node connected to some brick
    heal_pending: int  # entries to heal; -1: a brick does not answer

    @property
    def redundant(self) -> bool:
        """One storage machine could be lost now without stopping writes or losing the last copy of anything."""
        return (
            len(self.online) >= REPLICA
            and all(self.online.values())
            and self.heal_pending == 0
            and all(len(reached) == len(self.nodes) for reached in self.nodes_reached.values())
        )


def check_volume_name(name: str) -> str:
    if not VOLUME_NAME.match(name):
        raise BadInput(
            f"bad volume name {name!r}: letters, digits, '-' and '_', starting with a letter or digit",
            code="bad_volume_name",
        )
    return name


def check_bricks(bricks: Sequence[Brick]) -> None:
    """A replica-3 volume: bricks in sets of three (a distributed-replicate volume beyond three), and each set's
    copies on three different machines, or losing one machine loses two copies."""
    if not bricks or len(bricks) % REPLICA:
        raise BadInput(
            f"a replica-{REPLICA} volume needs bricks in sets of {REPLICA} (one per storage machine); "
            f"got {len(bricks)}",
            code="bad_brick",
        )
    if len(set(bricks)) != len(bricks):
        raise BadInput("a brick is given twice", code="bad_brick")
    for i in range(0, len(bricks), REPLICA):
        hosts = [b.host for b in bricks[i : i + REPLICA]]
        if len(set(hosts)) != REPLICA:
            raise BadInput(
                f"bricks {', '.join(map(str, bricks[i : i + REPLICA]))} are one replica set: put them on "
                f"{REPLICA} different storage machines, or losing one machine loses several copies",
                code="bad_brick",
            )


def _gluster_words(result: CommandResult) -> str:
    return " | ".join((result.stderr + "\n" + result.stdout).strip().splitlines()[-3:])


class GlusterCli:
    """The ``gluster`` management CLI of one storage machine (its ``glusterd``), in script mode."""

    def __init__(self, command: Sequence[str] = ("gluster",), *, timeout: float = 120.0) -> None:
        self.command = tuple(command)
        self.timeout = timeout

    async def run(self, *args: str) -> CommandResult:
        if shutil.which("gluster") is None:
            raise DriverError(
                "the gluster command is not installed here: install glusterfs-server on every storage machine "
                "(apt-get install glusterfs-server) and start glusterd",
                code="gluster_missing",
            )
        result = await run_command([*self.command, "--mode=script", *args], check=False, timeout=self.timeout)
        words = _gluster_words(result)
        if result.returncode != 0 and (
            "Connection failed" in words or ("glusterd" in words and "operational" in words)
        ):
            raise Unavailable(
                "glusterd is not running on this storage machine (or does not answer on port 24007): start it "
                "(`glusterd`, or `systemctl start glusterd`) and try again",
                code="glusterd_down",
            )
        return result

    async def volume_info(self, name: str) -> dict[str, str | list[str]] | None:
        """``Status``, ``Type`` and ``Bricks`` of a volume; None when there is no such volume."""
        result = await self.run("volume", "info", name)
        if result.returncode != 0:
            if "does not exist" in _gluster_words(result):
                return None
            raise DriverError(f"gluster volume info {name} failed: {_gluster_words(result)}", code="gluster_failed")
        info: dict[str, str | list[str]] = {"bricks": []}
        for line in result.stdout.splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                continue
            key, value = key.strip(), value.strip()
            if re.fullmatch(r"Brick\d+", key):
                bricks = info["bricks"]
                assert isinstance(bricks, list)
                bricks.append(value)
            elif key in ("Status", "Type", "Volume ID"):
                info[key.lower()] = value
        return info

    async def probe_peers(self, hosts: Sequence[str], wait_s: float = 30.0) -> None:
        """Bring every storage machine into this one's trusted pool and wait until each is connected."""
        for host in dict.fromkeys(hosts):
            result = await self.run("peer", "probe", host)
            if result.returncode == 0:
                continue
            words = _gluster_words(result)
            if "already part of another cluster" in words or "having volumes configured" in words:
                raise Conflict(
                    f"storage machine {host} already belongs to another GlusterFS pool: create the volume from a "
                    f"machine of that pool, or detach {host} from it (`gluster peer detach`)",
                    code="peer_in_other_pool",
                )
            raise Unavailable(
                f"storage machine {host} does not answer ({words}): is glusterd running there, is port 24007 "
                f"(and 49152-60999 for bricks) open, and does {host} resolve?",
                code="brick_unreachable",
                details={"host": host},
            )
        deadline = time.monotonic() + wait_s
        while True:
            result = await self.run("pool", "list")
            states = {}
            for line in result.stdout.splitlines()[1:]:
                cols = line.split()
                if len(cols) >= 3:
                    states[cols[1]] = cols[2]
            # this machine is "localhost" in the list: one brick host may be missing from it under its own name
            missing = [h for h in dict.fromkeys(hosts) if h not in states]
            down = [h for h, state in states.items() if h in hosts and state != "Connected"]
            if not down and len(missing) <= ("localhost" in states):
                return
            if time.monotonic() > deadline:
                late = ", ".join(down + missing)
                raise Unavailable(
                    f"storage machines {late} joined the pool but are not connected after {wait_s:.0f} s: check "
                    "that glusterd runs there and the network between the storage machines",
                    code="brick_unreachable",
                    details={"hosts": down + missing},
                )
            await asyncio.sleep(0.5)

    async def create_volume(
        self,
        name: str,
        bricks: Sequence[Brick],
        *,
        force: bool = False,
        options: dict[str, str] | None = None,
    ) -> VolumeReport:
        """Create and start a replica-3 volume with Deckard's options; a no-op for an existing one with the same
        bricks (its options are set again and it is started if stopped)."""
        t0 = time.monotonic()
        check_volume_name(name)
        check_bricks(bricks)
        wanted = [str(b) for b in bricks]
        created = False
        info = await self.volume_info(name)
        if info is not None and info["bricks"] != wanted:
            raise Conflict(
                f"volume {name} exists with other bricks ({', '.join(info['bricks'])}): choose another --volume, "
                f"or delete it first (`gluster volume stop {name}` then `gluster volume delete {name}`)",
                code="volume_exists",
                details={"bricks": info["bricks"]},
            )
        if info is None:
            await self.probe_peers([b.host for b in bricks])
            args = ["volume", "create", name, "replica", str(REPLICA), *wanted]
            result = await self.run(*args, *(["force"] if force else []))
            if result.returncode != 0:
                raise _create_error(name, _gluster_words(result))
            created = True
        chosen = {**VOLUME_OPTIONS, **(options or {})}
        pairs = [word for item in chosen.items() for word in item]
        result = await self.run("volume", "set", name, *pairs)  # one call: each set is a pool-wide transaction
        if result.returncode != 0:
            raise DriverError(
                f"gluster volume set {name} failed: {_gluster_words(result)}; options: {chosen}",
                code="gluster_failed",
            )
        info = await self.volume_info(name)
        if info is None or info.get("status") != "Started":
            result = await self.run("volume", "start", name)
            if result.returncode != 0 and "already started" not in _gluster_words(result):
                raise DriverError(
                    f"gluster volume start {name} failed: {_gluster_words(result)}; see `gluster volume status "
                    f"{name}` and the brick logs (/var/log/glusterfs/bricks/) on the storage machines",
                    code="gluster_failed",
                )
        seconds = round(time.monotonic() - t0, 2)
        log.info("gluster.volume_ready", volume=name, bricks=wanted, created=created, seconds=seconds)
        return VolumeReport(name, wanted, created, "Started", chosen, seconds)

    async def brick_clients(self, name: str) -> dict[str, set[str]]:
        """The hosts connected to each brick (the nodes' FUSE clients, the other machines' self-heal daemons)."""
        result = await self.run("volume", "status", name, "clients")
        if result.returncode != 0:
            raise DriverError(f"gluster volume status {name} failed: {_gluster_words(result)}", code="gluster_failed")
        clients: dict[str, set[str]] = {}
        brick = ""
        for line in result.stdout.splitlines():
            if line.startswith("Brick : "):
                brick = line.removeprefix("Brick : ").strip()
                clients[brick] = set()
            elif brick and re.match(r"^\S+:\d+\s+\d+\s+\d+", line):
                clients[brick].add(line.split()[0].rsplit(":", 1)[0])
        return clients

    async def bricks_online(self, name: str) -> dict[str, bool]:
        """Each brick (``HOST:/path``) and whether its process runs, as glusterd sees it."""
        result = await self.run("volume", "status", name, "--xml")
        if result.returncode != 0:
            raise DriverError(f"gluster volume status {name} failed: {_gluster_words(result)}", code="gluster_failed")
        try:
            root = ElementTree.fromstring(result.stdout)
        except ElementTree.ParseError as e:
            raise DriverError(f"gluster volume status {name}: unreadable answer ({e})", code="gluster_failed") from e
        online = {}
        for node in root.iter("node"):
            host, path = node.findtext("hostname", ""), node.findtext("path", "")
            if path.startswith("/"):  # the self-heal daemons are listed too, with path "localhost"
                online[f"{host}:{path}"] = node.findtext("status", "0") == "1"
        return online

    async def health(self, name: str) -> VolumeHealth:
        """Bricks up, what is left to heal, and which nodes (client hosts that are no storage machine) reach
        each brick."""
        online = await self.bricks_online(name)
        clients = await self.brick_clients(name)
        machines = {brick.rsplit(":", 1)[0] for brick in online}
        nodes = sorted({h for hosts in clients.values() for h in hosts} - machines - {"127.0.0.1", "localhost"})
        reached = {brick: sorted(set(clients.get(brick, set())) & set(nodes)) for brick in online}
        return VolumeHealth(name, online, reached, nodes, await self.heal_pending(name))

    async def redundant(self, name: str, client: str) -> bool:
        """Whether the volume could lose a storage machine now: nothing left to heal, and ``client`` (a node's
        address) connected to every brick.  A machine that came back is not a full copy again until both hold."""
        if await self.heal_pending(name) != 0:
            return False
        clients = await self.brick_clients(name)
        return len(clients) >= REPLICA and all(client in hosts for hosts in clients.values())

    async def heal_pending(self, name: str) -> int:
        """Entries still to be healed, summed over the bricks (0: every copy is the same again)."""
        result = await self.run("volume", "heal", name, "info")
        if result.returncode != 0:
            raise DriverError(
                f"gluster volume heal {name} info failed: {_gluster_words(result)}", code="gluster_failed"
            )
        counts = [int(m) for m in re.findall(r"Number of entries: (\d+)", result.stdout)]
        if not counts:
            return -1  # a brick not connected: "Number of entries: -"
        return sum(counts) + result.stdout.count("Number of entries: -")


def _create_error(name: str, words: str) -> DriverError | BadInput | Conflict | Unavailable:
    if "already exists" in words:
        return Conflict(f"volume {name} already exists: {words}", code="volume_exists")
    if "root partition" in words:
        return BadInput(
            "a brick is on the storage machine's root filesystem, which GlusterFS refuses (a full brick would fill "
            "the system): put each brick on a filesystem of its own, or add --force to accept it (tests, demos)",
            code="brick_on_root",
        )
    if "already part of a volume" in words:
        return Conflict(
            f"a brick already belongs to a volume ({words}): use an empty directory for each brick",
            code="brick_in_use",
        )
    if "not in 'Peer in Cluster' state" in words or "not connected" in words.lower():
        return Unavailable(f"a storage machine is not connected: {words}", code="brick_unreachable")
    return DriverError(f"gluster volume create {name} failed: {words}", code="gluster_failed")


GLUSTERD_VOL = Path("/etc/glusterfs/glusterd.vol")


def glusterd_ping_warning(vol: Path = GLUSTERD_VOL) -> str | None:
    """What to change in this storage machine's glusterd configuration, if anything.

    Debian's ``glusterd.vol`` says ``option ping-timeout 0``: glusterd never gives up on a peer that lost power,
    so on the others ``gluster volume status`` (and every command that takes the volume's lock) hangs for minutes
    and then answers "Another transaction is in progress" — measured here; the data path is not affected."""
    try:
        text = vol.read_text()
    except OSError:
        return None
    found = re.search(r"^\s*option\s+ping-timeout\s+(\d+)", text, re.MULTILINE)
    if found is None or int(found.group(1)) > 0:
        return None
    return (
        f"{vol} has `option ping-timeout 0`: after a storage machine loses power, gluster commands on the others "
        "hang for minutes. Set `option ping-timeout 10` there on every storage machine and restart glusterd"
    )


# ---- the client side: a node mounts the volume as its storage root --------------------------------------------
def mounted_fs(path: Path) -> tuple[str, str] | None:
    """(filesystem type, source) of the mount whose mount point is exactly ``path``; None if it is not one."""
    target = str(path.resolve())
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if _unescape(fields[4]) == target:
                found = (fields[sep + 1], _unescape(fields[sep + 2]))  # the last mount on top wins
    return found


def fs_type(path: Path) -> str:
    """Type of the filesystem ``path`` lives on (the mount with the longest mount point above it)."""
    target = str(path.resolve())
    best, kind = "", "unknown"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = _unescape(fields[4])
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fields[fields.index("-") + 1]
    return kind


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


async def mount_volume(
    servers: Sequence[str], volume: str, target: Path, *, log_file: Path | None = None, timeout: float = 60.0
) -> bool:
    """Mount ``volume`` at ``target`` over FUSE, asking ``servers[0]`` for its layout and the others if it is down
    (``backup-volfile-servers``).  True if mounted now, False if it already was (the same volume)."""
    check_volume_name(volume)
    if not servers or any(not s or ":" in s or "," in s or s.strip() != s for s in servers):
        raise BadInput(
            "give the storage machines as HOST[,HOST…] (the volume's servers, no ports)", code="bad_storage_server"
        )
    if not MOUNT_HELPER.exists():
        raise DriverError(
            "the GlusterFS client is not installed on this node: apt-get install glusterfs-client",
            code="gluster_client_missing",
        )
    current = mounted_fs(target) if target.exists() else None
    if current is not None:
        kind, source = current
        if kind == "fuse.glusterfs" and source.endswith(f":/{volume}"):
            return False
        raise Conflict(
            f"{target} is already a mount point ({kind} from {source}): unmount it first (`umount {target}`)",
            code="storage_root_mounted",
        )
    target.mkdir(parents=True, exist_ok=True)
    if any(target.iterdir()):
        raise Conflict(
            f"{target} is not empty (a local storage root?): the volume would hide its files. Move them onto the "
            f"volume first (mount it elsewhere, copy with `cp -a`, then empty {target}), or choose an empty directory",
            code="storage_root_not_empty",
        )
    log_path = log_file or Path("/var/log/glusterfs") / f"deckard-{volume}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    opts = [f"log-file={log_path}"]
    if len(servers) > 1:
        opts.insert(0, "backup-volfile-servers=" + ":".join(servers[1:]))
    args = ["mount", "-t", "glusterfs", "-o", ",".join(opts), f"{servers[0]}:/{volume}", str(target)]
    result = await run_command(args, check=False, timeout=timeout)
    if result.returncode != 0 or mounted_fs(target) is None:
        tail = ""
        if log_path.exists():
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if "] E [" in ln]
            tail = " | ".join(ln.split("]", 3)[-1].strip() for ln in lines[-2:])
        raise DriverError(
            f"mounting GlusterFS volume {volume} from {', '.join(servers)} at {target} failed: "
            f"{_gluster_words(result) or 'no output'}{'; ' + tail if tail else ''}. Check that the volume is "
            f"started (`gluster volume status {volume}` on a storage machine) and that this node reaches ports "
            f"24007 and 49152-60999 of every storage machine (log: {log_path})",
            code="mount_failed",
        )
    log.info("gluster.mounted", volume=volume, servers=list(servers), target=str(target))
    return True
