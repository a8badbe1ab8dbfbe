"""The container driver: one desktop is one LXC container driven by the LXC command-line tools.

Why the CLI and a hand-written config: the Python bindings only import under Debian's own interpreter,
and a config we render ourselves (``drivers/lxc_config.py``) says exactly what a desktop gets.

A desktop's root filesystem is an overlay: the image unpacked once per image id under ``basefs/``
(read-only lower layer, shared by every desktop of that image, unpacked ahead of its first start by
``prepare_image``, which the node's image loop calls for every tagged image) and a per-desktop ``upper``
directory under ``overlays/dk<farm>-<desktop id>`` (the same whichever node runs it) that is thrown away at
every start unless the OSF keeps it, and at a desktop's first start whatever (an earlier desktop's with the same id:
``GuestSpec.first_start``).  The user's home is a bind mount kept across starts.  The guest agent is the
container's init; before start the driver writes its token, the display secret and the hostname into the
upper layer.

Desktops are unprivileged (``docs/security.md`` says what root in a desktop can and cannot do):

* a user namespace maps the guest's ids 0…2^24 to a range of host ids owned by this farm
  (``lxc_config.farm_id_base``), so uid 0 inside is an unprivileged host uid.  Since LXC cannot idmap an overlay
  rootfs here, the unpacked image is shifted once into that range (``basefs/<image id>-u<base>``), and so are
  the per-desktop layer and the user's home (:func:`shift_tree`);
* a small capability set (``lxc_config.CAPS_KEEP``), ``no_new_privs`` (no setuid gains), a seccomp deny list
  (``lxc_config.render_seccomp``: module loading, kexec, ``open_by_handle_at``, BPF, perf, keyrings, new user
  namespaces, ...), devices limited to the standard character devices, ``/proc`` and ``/sys`` read-only
  where they reach the host and the leaky ``/proc`` files masked; AppArmor where the kernel has it.

On the host each guest leaves: ``run/lxc/<guest>/`` (config, logs, ``deckard.json`` with what teardown
needs, ``deckard.init`` naming its running init), its overlay, a veth on the bridge, its cgroup directories
(under every v1 controller, or in the one cgroup2 hierarchy), and a neighbour entry.  ``stop``/``kill`` remove all
of them and are safe to repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import structlog

from deckard.drivers import warm
from deckard.drivers.agent_code import (
    agent_command,
    boot_command,
    install_boot_script,
    precompile_agent,
    refresh_boot_script,
)
from deckard.drivers.base import GuestInfo, GuestSpec, VolumeMount
from deckard.drivers.cgroups import favordynmods_mount, host_pure_cgroup2, memory_usage, remove_cgroups
from deckard.drivers.display import display_password, vnc_password_file
from deckard.drivers.gluster import fs_type
from deckard.drivers.lxc_config import (
    ID_RANGE,
    apparmor_available,
    display_at_boot,
    farm_id_base,
    render_config,
    render_seccomp,
    render_up_hook,
)
from deckard.drivers.network import (
    delete_link,
    flush_neighbour,
    isolate_port,
    port_isolated,
    run_command,
    veth_name,
)
from deckard.drivers.volumes import mount_on_host, unmount_from_host
from deckard.model.errors import DriverError
from deckard.runtime.paths import FarmPaths, read_tail
from deckard.vma.agent import BOOT_DISPLAY_SECRET_FILE, NO_GLX_FILE

log = structlog.get_logger()

UNPACK_TIMEOUT_S = 600.0


INIT_FILE = "deckard.init"  # in a guest's LXC directory: "<init pid> <its network namespace's inode>"


def record_init(lxc_dir: Path, pid: int) -> None:
    """Note the running guest's init for :func:`recorded_init`: its pid and network namespace, which tell the very
    process from a later one given the same pid (a container has a namespace of its own)."""
    with contextlib.suppress(OSError):
        (lxc_dir / INIT_FILE).write_text(f"{pid} {os.stat(f'/proc/{pid}/ns/net').st_ino}\n")


def recorded_init(lxc_dir: Path) -> int | None:
    """The guest's init pid as :func:`record_init` noted it, if that very process still runs; None otherwise (no
    note, a torn one, the init gone: the caller asks LXC)."""
    try:
        pid, netns = (int(x) for x in (lxc_dir / INIT_FILE).read_text().split())
        return pid if os.stat(f"/proc/{pid}/ns/net").st_ino == netns else None
    except (OSError, ValueError):
        return None


def started_info(guest_name: str, pid_file: Path, ip: str) -> GuestInfo | None:
    """A guest ``lxc-start`` just started, without ``lxc-info`` (a program, 2-3 ms, between the start and the
    display's record): ``--pidfile`` names LXC's monitor, whose one child is the guest's init.  None when that is
    not so (the init gone already, the file missing): the caller asks LXC."""
    try:
        monitor = int(pid_file.read_text().strip())
        children = Path(f"/proc/{monitor}/task/{monitor}/children").read_text().split()
    except (OSError, ValueError):
        return None
    if len(children) != 1:
        return None
    return running_info(guest_name, int(children[0]), ip)


def running_info(guest_name: str, pid: int | None, ip: str | None) -> GuestInfo:
    """A running guest's info from its init's pid (its memory with it; None: LXC did not say)."""
    return GuestInfo(
        guest_name=guest_name, running=True, pid=pid, ip=ip, memory_bytes=memory_usage(pid) if pid else None
    )


FUSE_NODE = "/dev/deckard-fuse"  # see ContainerDriver._fuse_device


class ContainerDriver:
    """Desktops as LXC containers on this machine, all under ``paths.lxc`` and named ``paths.guest_prefix()*``."""

    name = "container"

    def __init__(self, paths: FarmPaths, id_base: int | None = None) -> None:
        self.paths = paths
        self.id_base = id_base if id_base is not None else farm_id_base(paths.farm_id)
        self.apparmor = apparmor_available()
        self.cgroup2 = host_pure_cgroup2()  # which keys the desktops' limits take (drivers/cgroups.py)
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[None]] = set()  # work a caller need not wait for (held till done)
        self._host_tuned = False
        self._boot_current: set[Path] = set()  # unpacked images whose boot script this node checked
        self._next: dict[str, GuestSpec] = {}  # guests started here whose next layer is made ahead (_remember)
        self._ahead: set[asyncio.Task[None]] = set()  # layers being made ahead: close() waits for them

    def _lock(self, guest_name: str) -> asyncio.Lock:
        return self._locks.setdefault(guest_name, asyncio.Lock())

    def _lxc_dir(self, guest_name: str) -> Path:
        return self.paths.lxc / guest_name

    def _lxc_args(self, guest_name: str) -> list[str]:
        return ["-n", guest_name, "-P", str(self.paths.lxc)]

    # -- start -----------------------------------------------------------------------------------------
    async def _tune_host(self) -> None:
        """Once per driver, before its first start: cgroup2's ``favordynmods``, so that ``lxc-start`` does not wait
        for an RCU grace period per cgroup move (``cgroups.favordynmods_mount``: 11 ms off every start here).  A
        kernel or host that refuses only logs: starts work as before."""
        self._host_tuned = True
        try:
            found = favordynmods_mount(Path("/proc/self/mounts").read_text())
        except OSError:
            found = None
        if found is None or found[1]:
            log.info("container.cgroup_moves", favordynmods=bool(found and found[1]), cgroup2=self.cgroup2)
            return
        result = await run_command(["mount", "-o", "remount,favordynmods", found[0]], check=False)
        log.info(
            "container.cgroup_moves",
            favordynmods=result.returncode == 0,
            mount=found[0],
            cgroup2=self.cgroup2,  # the limits' keys: lxc.cgroup2.* (pure cgroup2) or lxc.cgroup.* (v1 hierarchies)
            error=result.stderr.strip()[-300:] or None,
        )

    async def start(self, spec: GuestSpec) -> GuestInfo:
        if not self._host_tuned:
            await self._tune_host()
        async with self._lock(spec.guest_name):
            current = await self._state(spec.guest_name)
            if current is not None and current[0] == "RUNNING":
                info = await self._info(spec.guest_name)
                if info is not None:
                    return info
            # whatever an earlier start left (a crashed node, a stopped guest) goes first; a clean stop left nothing
            if current is not None or self._left_behind(spec.guest_name):
                await self._kill(spec.guest_name)
            basefs = await self.ensure_basefs(spec.image_id, spec.image_path)
            try:
                return await self._start(spec, basefs)
            except BaseException:
                await self._kill(spec.guest_name)
                raise

    async def _start(self, spec: GuestSpec, basefs: Path) -> GuestInfo:
        lxc_dir = self._lxc_dir(spec.guest_name)

        def traversable(*paths: Path) -> None:
            for path in paths:
                ensure_traversable(path, self.paths.home)

        def layers() -> Path:  # one trip to a worker thread: each trip waits on the event loop
            upper = self._prepare_overlay(spec, basefs)
            if spec.warm:  # its share of homes, where a user's is mounted at take-over (drivers/warm.py)
                warm.make_share(spec.home_dir)
            else:
                self._prepare_home(spec.home_dir, basefs, spec.user_uid)
            traversable(basefs, upper, spec.home_dir)
            return upper

        upper = await asyncio.to_thread(layers)
        volumes = await self._mount_volumes(spec)
        if volumes:
            await asyncio.to_thread(traversable, *(host for host, _name, _ro in volumes))
        lxc_dir.mkdir(parents=True, exist_ok=True)
        veth = veth_name(spec.guest_name)
        meta = {
            "desktop_id": spec.desktop_id,
            "ip": spec.reach_ip,
            "veth": veth,
            "keep_overlay": spec.keep_overlay,
            "overlay": str(upper.parent),
            "basefs": str(basefs),
            **({"share": str(spec.home_dir)} if spec.warm else {}),
        }
        (lxc_dir / "deckard.json").write_text(json.dumps(meta))
        up_hook = lxc_dir / "net-up"
        up_hook.write_text(render_up_hook())
        up_hook.chmod(0o755)
        seccomp = lxc_dir / "seccomp"
        seccomp.write_text(render_seccomp())
        config = lxc_dir / "config"
        fuse, boot = self._fuse_device(), boot_command(basefs)
        config.write_text(
            render_config(
                spec,
                basefs=basefs,
                upper=upper,
                lxc_dir=lxc_dir,
                up_hook=up_hook,
                id_base=self.id_base,
                seccomp=seccomp,
                apparmor=self.apparmor,
                volumes=volumes,
                agent=agent_command(basefs),
                fuse=fuse,
                boot=boot,
                cgroup2=self.cgroup2,
            )
        )
        # an older guest with this IP may still be in the neighbour table with its old MAC
        await flush_neighbour(spec.reach_ip)
        pid_file = lxc_dir / "monitor.pid"
        result = await run_command(
            ["lxc-start", *self._lxc_args(spec.guest_name), "-f", str(config), "-d", "-p", str(pid_file)], check=False
        )
        if result.returncode != 0:
            raise DriverError(
                f"lxc-start {spec.guest_name} failed: {self._log_tail(spec.guest_name) or result.stderr.strip()}",
                code="guest_start_failed",
            )
        if not await port_isolated(veth):
            # the up hook did not run (an older LXC?): isolate now, before the caller uses the guest
            await isolate_port(veth)
        info = started_info(spec.guest_name, pid_file, spec.reach_ip) or await self._info(spec.guest_name)
        if info is None or not info.running:
            raise DriverError(
                f"{spec.guest_name} stopped right after start: {self._log_tail(spec.guest_name)}",
                code="guest_start_failed",
            )
        log.info("container.started", guest=spec.guest_name, pid=info.pid, ip=spec.reach_ip)
        self._remember(spec)
        if info.pid is not None:  # its state is then read without asking LXC (_state)
            record_init(lxc_dir, info.pid)
        return dataclasses.replace(info, display_at_boot=display_at_boot(spec, boot, fuse))

    def _prepare_overlay(self, spec: GuestSpec, basefs: Path, *, ahead: bool = False) -> Path:
        """The desktop's upper layer with its secrets, names and its user's account, owned by the desktop's
        root.  A kept layer is the desktop root's to shape: nothing here follows a link it left (a link resolves
        on the host), and a directory of ours it replaced by something else fails the start.

        ``ahead``: a stopped desktop's next layer, made while nobody waits (:meth:`_prepare_next`): everything but
        the start's secrets, and a note of what it was made for (:data:`LAYER_AHEAD`).  A start that finds the note
        saying its own names, address and user only writes the secrets in; any other start discards it."""
        root = self._overlay_root(spec)
        upper = root / "upper"
        etc, ours = upper / "etc", upper / "etc/deckard"
        if not ahead and not spec.first_start and _take_ahead(root, _layer_key(spec, basefs)):
            secrets = self._write_secrets(spec, upper)
            for path in secrets:
                shift_entry(path, self.id_base)
            return upper
        if (ahead or spec.first_start or not spec.keep_overlay) and root.exists():
            shutil.rmtree(root)
        elif not ahead:  # a kept layer a note was left in (made ahead for another start): it is a used one now
            with contextlib.suppress(FileNotFoundError):
                (root / LAYER_AHEAD).unlink()
        for directory in (root, upper, etc, ours):
            real_directory(directory)
        os.chmod(root, 0o711)
        os.chmod(etc, 0o755)
        os.chmod(ours, 0o755)
        files = {
            etc / "hostname": f"{spec.guest_name}\n".encode(),
            etc / "hosts": f"127.0.0.1\tlocalhost\n{spec.ip}\t{spec.guest_name}\n".encode(),
            # the node's resolver listens on the gateway address (drivers/dns.py)
            etc / "resolv.conf": (
                f"nameserver {spec.gateway}\n"
                + (f"search {spec.dns_search}\n" if spec.dns_search else "")
                + "options timeout:2 attempts:2\n"
            ).encode(),
        }
        no_glx = upper / NO_GLX_FILE.lstrip("/")  # the display without OpenGL (``display.glx``): the guest reads it
        if not spec.glx:
            files[no_glx] = b""
        else:  # a kept layer has the last start's (in ``ours``, a real directory: no link followed)
            with contextlib.suppress(FileNotFoundError):
                no_glx.unlink()
        for path, data in files.items():
            write_new(path, data, 0o600 if path.parent == ours else 0o644)
        written = [upper, etc, ours, *files]
        if not spec.warm:  # a warm guest's user comes at take-over: its agent makes the account then
            write_account(upper, basefs, spec.user_login, spec.user_uid)  # owned like the image's files already
        if not ahead:
            written += self._write_secrets(spec, upper)
        # LXC mounts the overlay as the desktop's root, which makes the work directory beside the upper one:
        # a new layer (or a kept one from before user namespaces) is shifted whole, once; a kept layer only
        # needs what the driver just wrote, not a walk of everything the user's sessions left in it
        if root.lstat().st_uid < ID_RANGE:
            shift_tree(root, self.id_base)
        else:
            for path in written:
                shift_entry(path, self.id_base)
        if ahead:  # last: a layer made half-way has no note, and its start makes it anew
            write_new(root / LAYER_AHEAD, _layer_key(spec, basefs).encode(), 0o600)
        return upper

    @staticmethod
    def _write_secrets(spec: GuestSpec, upper: Path) -> list[Path]:
        """A start's own secrets into the layer: the agent's token and the display's password (and the user's
        copy, which the Xvnc the boot script starts as them reads: ``agent_code.py``); the paths written."""
        ours = upper / "etc/deckard"
        secret = vnc_password_file(display_password(spec.agent_token))
        files = {ours / "agent-token": (spec.agent_token + "\n").encode(), ours / "display-passwd": secret}
        for path, data in files.items():
            write_new(path, data, 0o600)
        if spec.warm:  # a warm guest's user comes at take-over
            return list(files)
        user_secret = upper / BOOT_DISPLAY_SECRET_FILE.lstrip("/")
        write_new(user_secret, secret, 0o400, owner=(spec.user_uid, spec.user_uid))
        return [*files, user_secret]

    def _remember(self, spec: GuestSpec) -> None:
        """Note what a guest was started with, without its secret: once it stops its next layer is made ahead."""
        if not spec.warm and not spec.keep_overlay:  # a kept layer stays; a warm guest's goes with it
            self._next[spec.guest_name] = dataclasses.replace(spec, agent_token="", first_start=False)

    def _prepare_next(self, guest_name: str) -> None:
        """After a stop: the guest's next layer, made in the background (its start then writes only its secrets,
        ~3 ms sooner on a busy node).  Nothing when the node did not start it (restarted since) or it runs again."""
        spec = self._next.pop(guest_name, None)
        if spec is None:
            return

        async def prepare() -> None:
            async with self._lock(guest_name):
                basefs = self._basefs_path(spec.image_id)
                if self._left_behind(guest_name) or not basefs.is_dir():
                    return
                try:
                    await asyncio.to_thread(self._prepare_overlay, spec, basefs, ahead=True)
                except (OSError, DriverError) as e:  # the next start makes the layer itself
                    log.info("container.layer_ahead_failed", guest=guest_name, error=str(e))

        task = asyncio.create_task(prepare(), name=f"layer-ahead-{guest_name}")
        self._ahead.add(task)
        task.add_done_callback(self._ahead.discard)

    def _overlay_root(self, spec: GuestSpec) -> Path:
        """A desktop's layer is named after the desktop (a kept one follows it), a warm guest's after the guest."""
        return self.paths.overlays / spec.guest_name if spec.warm else self.paths.overlay(spec.desktop_id)

    async def take_over(
        self, guest_name: str, *, ip: str, prefix_len: int, gateway: str, home_dir: Path, login: str, uid: int
    ) -> None:
        """The user's home into the running warm guest and the desktop's address onto it (``drivers/warm.py``)."""
        async with self._lock(guest_name):
            t0 = time.monotonic()
            steps: dict[str, float] = {}

            def step(name: str) -> None:
                steps[name] = round((time.monotonic() - t0) * 1000 - sum(steps.values()), 1)

            meta = self._meta(guest_name)
            state = await self._state(guest_name)
            pid = state[1] if state is not None and state[0] == "RUNNING" else None
            if pid is None or "share" not in meta:
                raise DriverError(f"{guest_name} is not a running warm guest", code="guest_exited")
            step("state_ms")
            share, basefs = Path(str(meta["share"])), Path(str(meta["basefs"]))

            def home() -> None:  # one trip to a worker thread: each trip waits on a busy event loop
                self._prepare_home(home_dir, basefs, uid)
                ensure_traversable(home_dir, self.paths.home)
                warm.mount_home(share, login, home_dir)

            await asyncio.to_thread(home)
            step("home_ms")
            old_ip = str(meta.get("ip", ""))
            await warm.readdress(pid, ip, prefix_len, gateway)
            step("address_ms")
            meta["ip"] = ip  # teardown flushes the address it has now
            (self._lxc_dir(guest_name) / "deckard.json").write_text(json.dumps(meta))
            await flush_neighbour(ip)  # an entry of an earlier guest at this address would stall the agent's call
            if old_ip:  # the next guest at the old address needs the host to forget this one: not on the user's clock
                task = asyncio.create_task(flush_neighbour(old_ip))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            step("neighbours_ms")
            log.info("container.taken_over", guest=guest_name, ip=ip, **steps)

    def _meta(self, guest_name: str) -> dict[str, object]:
        """What a start recorded for teardown and take-over (``deckard.json``); {} when it is missing or bad."""
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((self._lxc_dir(guest_name) / "deckard.json").read_text())
            if isinstance(meta, dict):
                return meta
        return {}

    def _prepare_home(self, home: Path, basefs: Path, user_uid: int) -> None:
        """A new home is made here and given to the user with the image's ``/etc/skel`` (as the agent would), so it
        is theirs when their display is shown, before the agent runs; an old one is shifted once.

        A home the desktop's root still owns (one made before this, left ungiven) is the agent's to hand over —
        nothing here writes into a directory root in a desktop could have shaped — except on a FUSE filesystem (a
        GlusterFS storage root), where only the host's root may change an owner (the server checks the caller's
        host uid, not the desktop's namespace), so the node hands it over there too."""
        if not home.exists():
            home.parent.mkdir(parents=True, exist_ok=True)
            home.mkdir(mode=0o700)
            give_home(home, basefs / "etc" / "skel", self.id_base + user_uid)  # empty, made just now
            return
        st = home.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise DriverError(f"the home {home} is not a directory", code="home_invalid")
        if st.st_uid < ID_RANGE:
            shift_tree(home, self.id_base)  # a home from before user namespaces, once
            st = home.lstat()
        if st.st_uid == self.id_base and fs_type(home).startswith("fuse"):
            give_home(home, basefs / "etc" / "skel", self.id_base + user_uid)

    async def prepare_image(self, image_id: int, image_path: Path) -> None:
        """Unpack the image ahead of its first start (the node's image loop, ``deckard up``), at low priority."""
        await self.ensure_basefs(image_id, image_path, background=True)

    @staticmethod
    def _fuse_device() -> Path | None:
        """A FUSE device node desktops' root may open (mode 0666, as Debian's udev makes /dev/fuse; this host's
        may be 0600), on /dev so no nodev mount spoils it; None without FUSE or without the right to make it.
        Opening it grants nothing: mounting takes the capability only a desktop's mounter has (vma/shares.py)."""
        node, rdev = FUSE_NODE, os.makedev(10, 229)
        try:
            st = os.lstat(node)
        except FileNotFoundError:
            if not os.path.exists("/dev/fuse"):
                return None
            try:
                os.mknod(node, stat.S_IFCHR | 0o666, rdev)
                os.chmod(node, 0o666)
                st = os.lstat(node)
            except OSError:
                return None
        except OSError:
            return None
        return Path(node) if stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev else None

    async def ensure_basefs(self, image_id: int, image_path: Path, *, background: bool = False) -> Path:
        """Unpack an image once into ``basefs/<image_id>-u<id base>``, shifted into the farm's id range
        (flock + temp dir + rename); return its path.  ``background``: tar runs niced (a start may be waiting)."""
        target = self._basefs_path(image_id)
        if target.is_dir():
            if target not in self._boot_current:  # unpacked by an older node: its boot script may be older too
                if await asyncio.to_thread(refresh_boot_script, target):
                    log.info("container.boot_script_updated", basefs=str(target))
                self._boot_current.add(target)
            return target
        if not image_path.is_file():
            raise DriverError(
                f"disk image {image_id} is missing: {image_path} does not exist; rebuild or re-import the image",
                code="image_missing",
                details={"path": str(image_path)},
            )
        self.paths.basefs.mkdir(parents=True, exist_ok=True)
        lock_path = self.paths.basefs / f".{image_id}.lock"
        lock_fd = await asyncio.to_thread(self._flock, lock_path)
        try:
            if target.is_dir():
                return target  # another node or task unpacked it while we waited
            # what an unpack killed mid-way left (we hold the lock: nobody else is writing there)
            for stale in self.paths.basefs.glob(f".{image_id}.unpack-*"):
                await asyncio.to_thread(shutil.rmtree, stale, True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{image_id}.unpack-", dir=self.paths.basefs))
            try:
                t0 = time.monotonic()
                log.info("container.unpack_image", image_id=image_id, path=str(image_path), background=background)
                nice = ["nice", "-n", "10"] if background else []
                await _unpack(image_path, tmp, nice)
                os.chmod(tmp, 0o755)
                await asyncio.to_thread(precompile_agent, tmp)  # before the shift: the bytecode is the guest's too
                await asyncio.to_thread(install_boot_script, tmp)
                # a thread cannot be cancelled: wait for it, so nothing writes into tmp while it is removed
                shift = asyncio.ensure_future(asyncio.to_thread(shift_tree, tmp, self.id_base))
                try:
                    await asyncio.shield(shift)
                except asyncio.CancelledError:
                    await asyncio.gather(shift, return_exceptions=True)
                    raise
                tmp.rename(target)
                self._boot_current.add(target)  # its boot script is this node's
                log.info("container.image_unpacked", image_id=image_id, seconds=round(time.monotonic() - t0, 2))
                # the same image unpacked by a release before user namespaces is never used again
                legacy = self.paths.basefs / str(image_id)
                if legacy.is_dir():
                    await asyncio.to_thread(shutil.rmtree, legacy, True)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, tmp, True)
                raise
        finally:
            os.close(lock_fd)
        return target

    def _basefs_path(self, image_id: int) -> Path:
        """Where an image is unpacked for this farm's id range (:meth:`ensure_basefs`)."""
        return self.paths.basefs / f"{image_id}-u{self.id_base}"

    @staticmethod
    def _flock(path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    # -- stop / kill -----------------------------------------------------------------------------------
    async def stop(self, guest_name: str, timeout: float = 10.0) -> None:
        async with self._lock(guest_name):
            state = await self._state(guest_name)
            if state is not None and state[0] == "RUNNING":
                # lxc-stop sends SIGPWR (the agent powers off cleanly), then kills after the timeout
                await run_command(
                    ["lxc-stop", *self._lxc_args(guest_name), "-t", str(max(int(timeout), 1))],
                    check=False,
                    timeout=timeout + 15,
                )
            await self._kill(guest_name)
        self._prepare_next(guest_name)

    async def kill(self, guest_name: str) -> None:
        async with self._lock(guest_name):
            await self._kill(guest_name)
        self._prepare_next(guest_name)

    async def _kill(self, guest_name: str) -> None:
        state = await self._state(guest_name)
        if state is not None and state[0] != "STOPPED":
            await run_command(["lxc-stop", *self._lxc_args(guest_name), "-k"], check=False, timeout=30)
        await self._cleanup(guest_name)

    def _left_behind(self, guest_name: str) -> bool:
        """Whether a start left anything :meth:`_cleanup` removes: every such thing (veth, cgroups, the meta
        record) comes with the guest's LXC directory, which the cleanup removes last, or is a mounted volume."""
        return self._lxc_dir(guest_name).exists() or self._volumes_dir(guest_name).exists()

    async def _cleanup(self, guest_name: str) -> None:
        """Remove what a start left on the host; the guest must not be running."""
        lxc_dir = self._lxc_dir(guest_name)
        meta = self._meta(guest_name)
        if isinstance(meta.get("share"), str):  # a warm guest's homes: unmounted, never removed with what is in them
            try:
                await asyncio.to_thread(warm.release_share, Path(str(meta["share"])))
            except (OSError, DriverError) as e:  # the share is outside lxc_dir: the rest goes all the same
                log.error("container.share_left", guest=guest_name, share=meta["share"], error=str(e))
        await delete_link(veth_name(guest_name))
        if isinstance(meta.get("ip"), str):
            await flush_neighbour(str(meta["ip"]))
        # without the record we cannot know the OSF kept the overlay: leave it, the next start decides
        desktop_id = meta.get("desktop_id")
        if meta.get("keep_overlay") is False and isinstance(meta.get("overlay"), str):
            await asyncio.to_thread(shutil.rmtree, Path(str(meta["overlay"])), True)
        elif meta.get("keep_overlay") is False and isinstance(desktop_id, int):  # recorded by an older release
            await asyncio.to_thread(shutil.rmtree, self.paths.overlay(desktop_id), True)
        await asyncio.to_thread(remove_cgroups, guest_name)
        await self._unmount_volumes(guest_name)
        await asyncio.to_thread(shutil.rmtree, lxc_dir, True)

    # -- observe ---------------------------------------------------------------------------------------
    async def inspect(self, guest_name: str) -> GuestInfo | None:
        return await self._info(guest_name)

    async def list(self) -> list[GuestInfo]:
        prefix = self.paths.guest_prefix()
        names: set[str] = set()
        if self.paths.lxc.is_dir():  # every guest LXC knows of has its directory there (what lxc-ls -P lists)
            names.update(p.name for p in self.paths.lxc.iterdir() if p.name.startswith(prefix))
        infos = [await self._info(name) for name in sorted(names)]
        return [info for info in infos if info is not None]

    async def close(self) -> None:
        """The containers are processes of their own and outlive the daemon; layers being made ahead are finished
        (a worker thread cannot be stopped half-way)."""
        await asyncio.gather(*self._ahead, return_exceptions=True)

    # -- volumes (docs/volumes.md): mounted on the host at start, bind-mounted on /media/<name> --------------
    async def attach_volume(self, guest_name: str, volume: VolumeMount) -> bool:  # noqa: ARG002
        """A container gets volumes at start only: this one at its next start."""
        return False

    async def detach_volume(self, guest_name: str, volume_id: int) -> bool:  # noqa: ARG002
        """The volume stays mounted in the running container until it stops (its image lock with it)."""
        return False

    def _volumes_dir(self, guest_name: str) -> Path:
        # beside the LXC directory, never in it: removing that directory must not reach into a mounted volume
        return self.paths.node_run_dir / "volumes" / guest_name

    async def _mount_volumes(self, spec: GuestSpec) -> tuple[tuple[Path, str, bool], ...]:
        """Mount each attached volume on the host; a new file system (or one a VM made) is handed to the
        desktop's root like a home."""
        mounted: tuple[tuple[Path, str, bool], ...] = ()
        for volume in spec.volumes:
            work = self._volumes_dir(spec.guest_name) / volume.serial
            mnt = await mount_on_host(volume.path, work, read_only=volume.read_only, label=volume.name or volume.serial)
            if not volume.read_only and mnt.lstat().st_uid < ID_RANGE:
                await asyncio.to_thread(shift_tree, mnt, self.id_base)
            mounted += ((mnt, volume.name or volume.serial, volume.read_only),)
        return mounted

    async def _unmount_volumes(self, guest_name: str) -> None:
        root = self._volumes_dir(guest_name)
        if not root.is_dir():
            return
        for work in sorted(root.iterdir()):
            await unmount_from_host(work)
        with contextlib.suppress(OSError):
            root.rmdir()

    async def console_log(self, guest_name: str, max_bytes: int = 65536) -> str:
        tail = read_tail(self._lxc_dir(guest_name) / "console.log", max_bytes)
        return tail[0] if tail else ""

    async def _state(self, guest_name: str) -> tuple[str, int | None] | None:
        """(STATE, init pid), or None when LXC does not know the guest.  A guest whose recorded init still runs is
        RUNNING without asking LXC: ``lxc-info`` is a program (~2 ms of CPU), and the node asks about every guest
        at each heartbeat and agent check; the others are LXC's answer (their init noted for the next time)."""
        lxc_dir = self._lxc_dir(guest_name)
        if not (lxc_dir / "config").exists():
            return None
        pid = recorded_init(lxc_dir)
        if pid is not None:
            return "RUNNING", pid
        result = await run_command(["lxc-info", *self._lxc_args(guest_name), "-s", "-p", "-H"], check=False)
        if result.returncode != 0:
            return None
        # output is "State:   RUNNING" / "PID:   1234" ("-H" only turns off human-readable sizes)
        fields = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
        state = fields.get("State", "STOPPED").strip()
        pid_text = fields.get("PID", "").strip()
        pid = int(pid_text) if pid_text.isdigit() else None
        if state == "RUNNING" and pid is not None:  # a guest started before the note existed
            record_init(lxc_dir, pid)
        return state, pid

    async def _info(self, guest_name: str) -> GuestInfo | None:
        lxc_dir = self._lxc_dir(guest_name)
        if not lxc_dir.exists():
            return None
        meta: dict[str, object] = {}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((lxc_dir / "deckard.json").read_text())
        ip = meta.get("ip") if isinstance(meta.get("ip"), str) else None
        state = await self._state(guest_name)
        if state is None or state[0] != "RUNNING":
            return GuestInfo(guest_name=guest_name, running=False, ip=str(ip) if ip else None)
        return running_info(guest_name, state[1], str(ip) if ip else None)

    def _log_tail(self, guest_name: str) -> str:
        try:
            lines = (self._lxc_dir(guest_name) / "lxc.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.split(" - ", 1)[-1] for line in lines[-3:])


async def _unpack(image_path: Path, dest: Path, prefix: list[str]) -> None:
    """``tar -x`` of an image into ``dest``; the tar is killed (not left writing) when the caller is cancelled."""
    args = [*prefix, "tar", "--numeric-owner", "-xf", str(image_path), "-C", str(dest)]
    try:
        result = await run_command(args, check=False, timeout=UNPACK_TIMEOUT_S)
    except DriverError:  # the timeout
        raise DriverError(
            f"unpacking the disk image {image_path} took more than {UNPACK_TIMEOUT_S:.0f} s",
            code="image_unpack_failed",
        ) from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()[-3:]
        raise DriverError(
            f"unpacking the disk image {image_path} failed (tar exit {result.returncode}): {' | '.join(lines)}",
            code="image_unpack_failed",
        )


# -- a layer made ahead ----------------------------------------------------------------------------------
LAYER_AHEAD = "ahead"  # in a layer's root, beside its upper and work directories: never in what the guest sees


def _layer_key(spec: GuestSpec, basefs: Path) -> str:
    """Everything a layer made ahead holds, as its note says it: names, address, resolver, display, account."""
    return json.dumps(
        [spec.guest_name, str(basefs), spec.ip, spec.gateway, spec.dns_search, spec.glx, spec.user_login, spec.user_uid]
    )


def _take_ahead(root: Path, key: str) -> bool:
    """Whether ``root`` is a layer made ahead for ``key``; its note is removed then, so that the layer is a used
    one from here on (a start that fails or a node that stops finds no note: the next start discards it)."""
    found = read_regular(root / LAYER_AHEAD)
    if found is None or found[0].st_uid != 0 or found[1] != key:
        return False
    (root / LAYER_AHEAD).unlink()
    return True


# -- the user's account, ahead of the start -------------------------------------------------------------
ACCOUNT_FILES = ("passwd", "group", "shadow", "gshadow")


def write_account(upper: Path, basefs: Path, login: str, uid: int) -> bool:
    """Add the desktop's user to the account files of its layer before it starts, as the agent's ``groupadd`` and
    ``useradd`` would (uid = gid, home ``/home/<login>``, bash, no password): the agent then finds the account and
    its display starts without them.  Nothing is written when the layer or the image already knows the name, uid
    or gid (a kept layer, a system account: the agent decides then, as before), lacks one of the files or has
    something else than a file there.  Each file keeps the image's owner and mode; True when it was written."""
    texts: dict[str, tuple[os.stat_result, str]] = {}
    for name in ACCOUNT_FILES:
        found = read_regular(upper / "etc" / name)
        if found is None and not os.path.lexists(upper / "etc" / name):
            found = read_regular(basefs / "etc" / name)
        if found is None:
            return False
        texts[name] = found
    taken = {line.split(":", 1)[0] for name in ("passwd", "group") for line in texts[name][1].splitlines()}
    ids = {f.split(":")[2] for name in ("passwd", "group") for f in texts[name][1].splitlines() if f.count(":") >= 3}
    if login in taken or str(uid) in ids:
        return False
    days = int(time.time() // 86400)
    lines = {
        "passwd": f"{login}:x:{uid}:{uid}::/home/{login}:/bin/bash",
        "group": f"{login}:x:{uid}:",
        "shadow": f"{login}:!:{days}:0:99999:7:::",
        "gshadow": f"{login}:!::",
    }
    for name, line in lines.items():
        st, text = texts[name]
        target = upper / "etc" / name
        tmp = target.with_name(f".{name}.deckard")
        data = (text + ("" if text.endswith("\n") or not text else "\n") + line + "\n").encode()
        write_new(tmp, data, stat.S_IMODE(st.st_mode), owner=(st.st_uid, st.st_gid))
        os.replace(tmp, target)  # a rename: it replaces a link, never writes through one
    return True


def real_directory(path: Path) -> None:
    """Make ``path`` a directory if it is missing; a link or anything else there is a ``DriverError``."""
    with contextlib.suppress(FileExistsError):
        path.mkdir()
    if not stat.S_ISDIR(path.lstat().st_mode):
        raise DriverError(
            f"{path} is not a directory (the desktop's kept layer has a link or a file there): discard the "
            "desktop's layer (`deckard desktop reset`) or remove it",
            code="overlay_invalid",
        )


def write_new(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Write ``path`` afresh: whatever is there goes first (a link is removed, never followed) and the file is
    created exclusively, so a desktop's root cannot steer the host's writes through its layer."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        if owner is not None:
            os.fchown(f.fileno(), *owner)
        os.fchmod(f.fileno(), mode)
        f.write(data)


def read_regular(path: Path) -> tuple[os.stat_result, str] | None:
    """A regular file's status and text, read without following a link; None for anything else or nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        return st, f.read().decode(errors="replace")


# -- ownership -----------------------------------------------------------------------------------------
def shift_tree(root: Path, id_base: int) -> int:
    """Move every uid/gid below :data:`ID_RANGE` under ``root`` up by ``id_base``; return how many entries.

    Ids already in a shifted range are left alone, so it is safe to repeat.  ``chown`` clears set-user-id and
    set-group-id bits, which are put back.  Symlinks are changed themselves, never followed.
    """
    changed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            changed += shift_entry(dirpath if name == "." else os.path.join(dirpath, name), id_base)
    return changed


def shift_entry(path: str | Path, id_base: int) -> bool:
    """:func:`shift_tree` for one entry; True when it changed."""
    st = os.lstat(path)
    uid = st.st_uid + id_base if st.st_uid < ID_RANGE else st.st_uid
    gid = st.st_gid + id_base if st.st_gid < ID_RANGE else st.st_gid
    if (uid, gid) == (st.st_uid, st.st_gid):
        return False
    os.lchown(path, uid, gid)
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    return True


def give_home(home: Path, skel: Path, uid: int) -> None:
    """Fill a new home with the image's default dotfiles and give all of it to ``uid`` (a host uid), as the agent
    would inside the desktop (``vma/agent.py``, ``provision_user``)."""
    if skel.is_dir():
        shutil.copytree(skel, home, dirs_exist_ok=True, symlinks=True)
    for root, dirs, files in os.walk(home):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, uid)
    os.chown(home, uid, uid)
    os.chmod(home, 0o750)


def ensure_traversable(path: Path, farm_home: Path) -> None:
    """Let the desktop's root (an unprivileged host uid) walk down to ``path``, as LXC requires.

    Directories of the farm get the "others may traverse" bit (never read); a directory above the farm home
    that lacks it is the operator's to change, and the error says how.
    """
    farm_home = farm_home.resolve()
    for directory in reversed(path.resolve().parents):
        mode = directory.stat().st_mode
        if mode & stat.S_IXOTH:
            continue
        if directory == farm_home or farm_home in directory.parents:
            os.chmod(directory, stat.S_IMODE(mode) | stat.S_IXOTH)
        else:
            raise DriverError(
                f"desktops run as an unprivileged host user that cannot reach {path}: "
                f"allow traversal with `chmod o+x {directory}` or move the farm home",
                code="storage_not_traversable",
            )
