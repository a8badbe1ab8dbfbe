"""The LXC config the container driver writes for a desktop: limits, identity, mounts and isolation.

Rendering is pure, so every promise of the config is checked here without root; the e2e tests check that
LXC honours it.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deckard.drivers import load_driver
from deckard.drivers.base import GuestSpec
from deckard.drivers.cgroups import favordynmods_mount, pure_cgroup2
from deckard.drivers.container import (
    INIT_FILE,
    LAYER_AHEAD,
    ContainerDriver,
    record_init,
    recorded_init,
    shift_tree,
    started_info,
    write_account,
)
from deckard.drivers.fake import FakeDriver
from deckard.drivers.lxc_config import (
    ID_RANGE,
    display_at_boot,
    farm_id_base,
    render_config,
    render_seccomp,
    render_up_hook,
)
from deckard.drivers.network import IFNAMSIZ, neighbour_known, veth_name
from deckard.model.errors import BadInput, DriverError
from deckard.runtime.paths import FarmPaths


def make_spec(**overrides: object) -> GuestSpec:
    values: dict = dict(
        desktop_id=42,
        guest_name="dkabc123-42",
        image_id=7,
        image_path=Path("/srv/images/desktop.tar.zst"),
        ip="10.0.0.42",
        prefix_len=16,
        gateway="10.0.0.1",
        mac="54:52:00:00:00:2a",
        bridge="deckard0",
        memory_mib=768,
        cpus=1.5,
        user_login="alice",
        user_uid=10001,
        home_dir=Path("/srv/homes/t1/alice"),
        agent_token="tok",
    )
    values.update(overrides)
    return GuestSpec(**values)


def config_of(
    spec: GuestSpec, fuse: Path | None = None, boot: str | None = None, cgroup2: bool = False
) -> dict[str, list[str]]:
    text = render_config(
        spec,
        basefs=Path("/srv/basefs/7"),
        upper=Path("/srv/overlays/dkabc123-42/upper"),
        lxc_dir=Path("/run/deckard/lxc/dkabc123-42"),
        up_hook=Path("/run/deckard/lxc/dkabc123-42/net-up"),
        id_base=5 * ID_RANGE,
        seccomp=Path("/run/deckard/lxc/dkabc123-42/seccomp"),
        fuse=fuse,
        boot=boot,
        cgroup2=cgroup2,
    )
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" = ")
            out.setdefault(key, []).append(value)
    return out


def test_limits_come_from_the_osf() -> None:
    cfg = config_of(make_spec())
    assert cfg["lxc.cgroup.memory.limit_in_bytes"] == [str(768 * 1024 * 1024)]
    assert cfg["lxc.cgroup.cpu.cfs_period_us"] == ["100000"]
    assert cfg["lxc.cgroup.cpu.cfs_quota_us"] == ["150000"]
    assert int(cfg["lxc.cgroup.pids.max"][0]) > 0
    # cgroup v1 keys only: a host with v1 hierarchies ignores lxc.cgroup2.*
    assert not [key for key in cfg if key.startswith("lxc.cgroup2.")]


def test_a_pure_cgroup2_host_gets_the_same_limits_in_its_own_keys() -> None:
    """LXC ignores lxc.cgroup.* on a pure cgroup2 host (Debian 12 as installed): the desktop would run unlimited."""
    fuse = Path("/dev/deckard-fuse")
    v1 = config_of(make_spec(mounter=True), fuse=fuse)
    cfg = config_of(make_spec(mounter=True), fuse=fuse, cgroup2=True)
    assert not [key for key in cfg if key.startswith("lxc.cgroup.")]
    assert cfg["lxc.cgroup2.memory.max"] == [str(768 * 1024 * 1024)]
    assert cfg["lxc.cgroup2.cpu.max"] == ["150000 100000"]
    assert cfg["lxc.cgroup2.pids.max"] == v1["lxc.cgroup.pids.max"]
    assert cfg["lxc.cgroup2.devices.deny"] == ["a"]
    assert cfg["lxc.cgroup2.devices.allow"] == v1["lxc.cgroup.devices.allow"]
    assert "c 10:229 rwm" in cfg["lxc.cgroup2.devices.allow"]
    assert {k: v for k, v in cfg.items() if "cgroup" not in k} == {k: v for k, v in v1.items() if "cgroup" not in k}


def test_the_cgroup_layout_is_told_as_lxc_tells_it() -> None:
    """One ``0::`` line: pure cgroup2; v1 lines (with or without a unified one beside them): v1 keys."""
    assert pure_cgroup2("0::/system.slice/deckard.service\n")
    assert not pure_cgroup2("12:pids:/\n4:memory:/x\n1:name=systemd:/\n0::/\n")
    assert not pure_cgroup2("4:memory:/x\n")
    assert not pure_cgroup2("")


def test_identity_network_and_isolation_hook() -> None:
    cfg = config_of(make_spec())
    assert cfg["lxc.uts.name"] == ["dkabc123-42"]
    assert cfg["lxc.net.0.type"] == ["veth"]
    assert cfg["lxc.net.0.link"] == ["deckard0"]
    assert cfg["lxc.net.0.hwaddr"] == ["54:52:00:00:00:2a"]
    assert cfg["lxc.net.0.ipv4.address"] == ["10.0.0.42/16"]
    assert cfg["lxc.net.0.ipv4.gateway"] == ["10.0.0.1"]
    assert cfg["lxc.net.0.veth.pair"] == [veth_name("dkabc123-42")]
    assert cfg["lxc.net.0.script.up"] == ["/run/deckard/lxc/dkabc123-42/net-up"]
    hook = render_up_hook()
    assert hook.startswith("#!/bin/sh\n") and 'port="${LXC_NET_PEER:-$6}"' in hook
    assert 'echo 1 > "/sys/class/net/$port/brport/isolated"' not in hook  # through $flag, checked writable first
    assert 'flag="/sys/class/net/$port/brport/isolated"' in hook and 'echo 1 > "$flag"' in hook
    assert 'link set dev "$port" isolated on' in hook  # where the kernel has no such flag


def test_rootfs_is_an_overlay_with_the_agent_as_init_starting_the_users_display() -> None:
    cfg = config_of(make_spec())
    assert cfg["lxc.rootfs.path"] == ["overlay:/srv/basefs/7:/srv/overlays/dkabc123-42/upper"]
    assert cfg["lxc.init.cmd"] == ["/usr/local/sbin/deckard-vma --display-for alice:10001"]
    assert cfg["lxc.apparmor.profile"] == ["unconfined"]  # no AppArmor in this kernel: see the next test


def test_an_image_with_the_boot_script_starts_the_users_display_before_the_agent() -> None:
    """The boot script (``agent_code.boot_script``) is init for a desktop's own guest; a warm guest (nobody's
    display yet) and a guest with the mounter (its capabilities are the agent's to drop first) start the agent."""
    boot = "/bin/sh /usr/local/lib/deckard-vma/boot"
    assert config_of(make_spec(), boot=boot)["lxc.init.cmd"] == [f"{boot} alice 10001"]
    assert config_of(make_spec(warm=True), boot=boot)["lxc.init.cmd"] == ["/usr/local/sbin/deckard-vma --warm"]
    with_mounter = config_of(make_spec(mounter=True), fuse=Path("/dev/deckard-fuse"), boot=boot)
    assert with_mounter["lxc.init.cmd"] == ["/usr/local/sbin/deckard-vma --display-for alice:10001"]
    # what the driver tells the node: only the first shows its display before its agent answers (``display_at``)
    fuse = Path("/dev/deckard-fuse")
    assert display_at_boot(make_spec(), boot, fuse)
    assert not display_at_boot(make_spec(warm=True), boot, fuse)
    assert not display_at_boot(make_spec(mounter=True), boot, fuse)
    assert display_at_boot(make_spec(mounter=True), boot, None)  # no FUSE here: no mounter either
    assert not display_at_boot(make_spec(), None, fuse)  # an image from before the boot script


def test_the_agents_run_directory_and_the_x_sockets_are_the_containers_mounts() -> None:
    """Made by LXC at start (the boot script execs nothing to make them), fresh at every start like ``/run``."""
    mounts = config_of(make_spec())["lxc.mount.entry"]
    assert "tmpfs run/deckard tmpfs rw,nosuid,nodev,mode=755,size=32m,create=dir 0 0" in mounts
    assert "tmpfs tmp/.X11-unix tmpfs rw,nosuid,nodev,mode=1777,size=1m,create=dir 0 0" in mounts
    order = [m.split()[1] for m in mounts]
    assert order.index("run") < order.index("run/deckard") and order.index("tmp") < order.index("tmp/.X11-unix")


def test_a_started_guest_is_known_from_the_monitor_lxc_start_named(tmp_path: Path) -> None:
    """No ``lxc-info`` between the start and the display's record: ``lxc-start --pidfile`` names its monitor, whose
    one child is the guest's init."""
    pid_file = tmp_path / "monitor.pid"
    assert started_info("g", pid_file, "10.0.0.5") is None  # no file: the caller asks LXC
    monitor = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    try:
        assert monitor.stdout is not None
        init = int(monitor.stdout.readline())
        pid_file.write_text(f"{monitor.pid}\n")
        info = started_info("g", pid_file, "10.0.0.5")
        assert info is not None and info.running and (info.pid, info.ip) == (init, "10.0.0.5")
        os.kill(init, 9)  # the init gone: no child left, the caller asks LXC
        assert wait_until(lambda: started_info("g", pid_file, "10.0.0.5") is None)
    finally:
        monitor.kill()
        monitor.wait()
    pid_file.write_text(f"{monitor.pid}\n")  # the monitor gone as well
    assert started_info("g", pid_file, "10.0.0.5") is None
    pid_file.write_text("not a pid\n")
    assert started_info("g", pid_file, "10.0.0.5") is None


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_desktops_are_unprivileged() -> None:
    """A user namespace onto the farm's id range, five capabilities, no new privileges, seccomp, masked /proc."""
    cfg = config_of(make_spec())
    assert cfg["lxc.idmap"] == [f"u 0 {5 * ID_RANGE} {ID_RANGE}", f"g 0 {5 * ID_RANGE} {ID_RANGE}"]
    assert cfg["lxc.cap.keep"] == ["chown fowner setuid setgid kill"] and "lxc.cap.drop" not in cfg
    assert cfg["lxc.no_new_privs"] == ["1"]
    assert cfg["lxc.seccomp.profile"] == ["/run/deckard/lxc/dkabc123-42/seccomp"]
    assert "/dev/null proc/kcore none bind,optional 0 0" in cfg["lxc.mount.entry"]
    assert cfg["lxc.mount.auto"] == ["proc:mixed sys:ro"]


def test_seccomp_policy_denies_the_ways_out() -> None:
    policy = render_seccomp().splitlines()
    assert policy[:2] == ["2", "denylist"]
    for call in ("open_by_handle_at", "name_to_handle_at", "bpf", "perf_event_open", "init_module", "kexec_load"):
        assert f"{call} errno 1" in policy
    assert "clone3 errno 38" in policy
    assert "unshare errno 1 [0,268435456,SCMP_CMP_MASKED_EQ,268435456]" in policy


def test_farm_id_ranges_never_overlap_root_nor_wrap() -> None:
    bases = {farm_id_base(f"{n:06x}") for n in range(0, 1 << 24, 4099)}
    assert min(bases) == ID_RANGE and max(bases) + ID_RANGE < 1 << 32
    assert all(b % ID_RANGE == 0 for b in bases)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_shift_tree_moves_ids_once_and_keeps_setuid(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    su = root / "bin/su"
    su.write_text("x")
    os.chmod(su, 0o4755)
    os.symlink("su", root / "bin/link")
    os.chown(root / "bin", 0, 5)
    base = 3 * ID_RANGE
    assert shift_tree(root, base) == 4
    assert (su.stat().st_uid, su.stat().st_gid) == (base, base)
    assert stat.S_IMODE(su.stat().st_mode) == 0o4755, "chown clears set-uid: it is put back"
    assert os.lstat(root / "bin/link").st_uid == base
    assert (root / "bin").stat().st_gid == base + 5
    assert shift_tree(root, base) == 0, "shifted ids are left alone"


def test_home_is_bind_mounted_and_tmp_is_fresh() -> None:
    mounts = config_of(make_spec())["lxc.mount.entry"]
    assert "/srv/homes/t1/alice home/alice none bind,create=dir 0 0" in mounts
    assert any(m.startswith("tmpfs tmp tmpfs ") for m in mounts)
    assert any(m.startswith("tmpfs run tmpfs ") for m in mounts)
    assert any(m.startswith("tmpfs dev/shm tmpfs ") for m in mounts)


def test_devices_are_a_whitelist() -> None:
    cfg = config_of(make_spec())
    assert cfg["lxc.cgroup.devices.deny"] == ["a"]
    assert "c 136:* rwm" in cfg["lxc.cgroup.devices.allow"]
    assert "c 10:229 rwm" not in cfg["lxc.cgroup.devices.allow"]  # FUSE only where the node gives a device node


def test_the_mounter_and_fuse_only_where_shared_folders_may_be_mounted() -> None:
    """``nx.shares.in_containers`` (GuestSpec.mounter): PID 1 gets sys_admin and setpcap to fork the mounter and
    drop them (tests/e2e/test_container_driver.py checks the drop), and /dev/fuse from the node's device node."""
    fuse = Path("/dev/deckard-fuse")
    for spec, node in ((make_spec(), fuse), (make_spec(mounter=True), None)):
        cfg = config_of(spec, fuse=node)  # off, or no FUSE on the node: nothing more than the five
        assert cfg["lxc.cap.keep"] == ["chown fowner setuid setgid kill"]
        assert "c 10:229 rwm" not in cfg["lxc.cgroup.devices.allow"]
        assert not any("dev/fuse" in m for m in cfg["lxc.mount.entry"])
    cfg = config_of(make_spec(mounter=True), fuse=fuse)
    assert cfg["lxc.cap.keep"] == ["chown fowner setuid setgid kill sys_admin setpcap"]
    assert "c 10:229 rwm" in cfg["lxc.cgroup.devices.allow"]
    assert "/dev/deckard-fuse dev/fuse none bind,create=file 0 0" in cfg["lxc.mount.entry"]


def test_veth_names_fit_linux_and_are_stable() -> None:
    assert veth_name("dkabc123-42") == "vdkabc12342"
    long = veth_name("dkabc123-1234567890")
    assert len(long) == IFNAMSIZ and long == veth_name("dkabc123-1234567890")
    assert long != veth_name("dkabc123-1234567891")


async def test_missing_image_is_a_clear_driver_error(tmp_path: Path) -> None:
    driver = ContainerDriver(FarmPaths(tmp_path))
    with pytest.raises(DriverError) as err:
        await driver.ensure_basefs(7, tmp_path / "gone.tar.zst")
    assert err.value.code == "image_missing"
    assert str(tmp_path / "gone.tar.zst") in err.value.message and "rebuild" in err.value.message


async def test_unknown_guests_are_absent_not_errors(tmp_path: Path) -> None:
    driver = ContainerDriver(FarmPaths(tmp_path))
    assert await driver.inspect("dkabc123-1") is None
    assert await driver.list() == []
    await driver.kill("dkabc123-1")  # idempotent on nothing


async def test_fake_driver_reflects_starts_and_stops(tmp_path: Path) -> None:
    paths = FarmPaths(tmp_path)
    driver = load_driver("fake", paths)
    assert isinstance(driver, FakeDriver)
    spec = make_spec(guest_name=paths.guest_name(1), ip="127.231.0.42")  # its guests bind loopback addresses
    info = await driver.start(spec)
    assert info.running and info.ip == spec.ip
    assert await driver.start(spec) == info
    assert [g.guest_name for g in await driver.list()] == [spec.guest_name]
    await driver.stop(spec.guest_name)
    await driver.kill(spec.guest_name)
    assert await driver.inspect(spec.guest_name) is None and await driver.list() == []


def test_load_driver_by_name(tmp_path: Path) -> None:
    assert load_driver("container", FarmPaths(tmp_path)).name == "container"
    with pytest.raises(BadInput) as err:
        load_driver("hyperv", FarmPaths(tmp_path))
    assert err.value.code == "unknown_driver"


def test_nodes_sharing_a_machine_name_their_guests_apart_but_share_overlays(tmp_path: Path) -> None:
    aio = FarmPaths(tmp_path)
    same = FarmPaths(tmp_path, tmp_path / "run")  # the all-in-one node registers <home>/run as its run dir
    n2, n3 = FarmPaths(tmp_path, tmp_path / "n2"), FarmPaths(tmp_path, tmp_path / "n3")
    names = {p.guest_name(7) for p in (aio, n2, n3)}
    assert len(names) == 3 and same.guest_name(7) == aio.guest_name(7)
    assert all(len(veth_name(name)) <= 15 for name in names)
    assert n2.guest_name(7).startswith(n2.guest_prefix()) and not n2.guest_name(7).startswith(n3.guest_prefix())
    assert aio.overlay(7) == n2.overlay(7) == n3.overlay(7)  # a kept writable layer follows the desktop


def test_a_neighbour_is_known_only_when_the_table_has_its_exact_address(tmp_path: Path) -> None:
    table = tmp_path / "arp"
    table.write_text(
        "IP address       HW type     Flags       HW address            Mask     Device\n"
        "10.214.89.11     0x1         0x2         54:52:00:d6:59:0b     *        dke9839\n"
        "10.214.89.1      0x1         0x0         00:00:00:00:00:00     *        dke9839\n"
    )
    assert neighbour_known("10.214.89.11", table) and neighbour_known("10.214.89.1", table)  # incomplete counts
    assert not neighbour_known("10.214.89.111", table) and not neighbour_known("10.214.89.", table)
    assert neighbour_known("10.0.0.1", tmp_path / "missing")  # cannot tell: flush to be safe


def _image_etc(root: Path) -> Path:
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/nonexistent:/bin/false\n")
    (etc / "group").write_text("root:x:0:\nshadow:x:42:\nusers:x:100:\n")
    for name in ("shadow", "gshadow"):
        (etc / name).write_text("root:*::\n")
        (etc / name).chmod(0o640)
    return root


def test_the_users_account_is_written_into_the_layer_ahead_as_useradd_would(tmp_path: Path) -> None:
    basefs, upper = _image_etc(tmp_path / "basefs"), tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    assert write_account(upper, basefs, "alice", 10001)
    passwd = (upper / "etc/passwd").read_text().splitlines()
    assert passwd[:2] == (basefs / "etc/passwd").read_text().splitlines()  # the image's accounts first
    assert passwd[2] == "alice:x:10001:10001::/home/alice:/bin/bash"
    assert (upper / "etc/group").read_text().splitlines()[-1] == "alice:x:10001:"
    assert (upper / "etc/shadow").read_text().splitlines()[-1].startswith("alice:!:")  # no password: locked
    assert (upper / "etc/gshadow").read_text().splitlines()[-1] == "alice:!::"
    assert stat.S_IMODE((upper / "etc/shadow").stat().st_mode) == 0o640  # the image's mode (and owner)
    assert (basefs / "etc/passwd").read_text().count("alice") == 0  # the shared image is never written
    assert not list((upper / "etc").glob(".*"))

    # a kept layer already has it; a name or id the image uses is the agent's to refuse, as before
    assert not write_account(upper, basefs, "alice", 10001)
    assert [line for line in (upper / "etc/passwd").read_text().splitlines() if line.startswith("alice:")] == [
        passwd[2]
    ]
    fresh = tmp_path / "fresh"
    (fresh / "etc").mkdir(parents=True)
    assert not write_account(fresh, basefs, "nobody", 10002) and not (fresh / "etc/passwd").exists()
    assert not write_account(fresh, basefs, "bob", 100)  # gid 100 is the image's "users"
    (basefs / "etc/gshadow").unlink()
    assert not write_account(fresh, basefs, "carol", 10003)  # an image without one of the files: the agent's job


@pytest.mark.skipif(os.geteuid() != 0, reason="the layer is handed to the desktop's root (chown): needs root")
def test_a_desktops_first_start_discards_a_layer_an_earlier_desktop_left_at_its_path(tmp_path: Path) -> None:
    """A layer a deleted desktop left at the path (SQLite reused ids before revision 0018): an OSF that keeps
    layers must not hand the new desktop (maybe another tenant's) the deleted one's files.  Later starts keep it."""
    paths = FarmPaths(tmp_path / "farm")
    paths.make()
    basefs = _image_etc(tmp_path / "basefs")
    driver = ContainerDriver(paths)
    earlier = make_spec(desktop_id=7, keep_overlay=True, user_login="mallory", user_uid=10009)
    left = driver._prepare_overlay(earlier, basefs) / "var/secret"
    left.parent.mkdir(parents=True)
    left.write_text("the deleted desktop's\n")
    spec = make_spec(desktop_id=7, keep_overlay=True, first_start=True)
    etc = driver._prepare_overlay(spec, basefs) / "etc"
    assert not left.exists()
    assert "mallory" not in (etc / "passwd").read_text() and "alice:x:10001" in (etc / "passwd").read_text()
    mine = etc.parent / "var/mine"
    mine.parent.mkdir(parents=True)
    mine.write_text("kept\n")
    driver._prepare_overlay(dataclasses.replace(spec, first_start=False), basefs)
    assert mine.read_text() == "kept\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="the layer is handed to the desktop's root (chown): needs root")
def test_a_layer_made_ahead_gets_only_its_starts_secrets_when_made_for_that_start(tmp_path: Path) -> None:
    """A stopped desktop's next layer is made while nobody waits; its start writes only the secrets in.  A layer
    made for another user, name or address, one a start already used, or a desktop's first start, is made anew."""
    paths = FarmPaths(tmp_path / "farm")
    paths.make()
    basefs = _image_etc(tmp_path / "basefs")
    driver = ContainerDriver(paths)
    spec = make_spec(desktop_id=7, glx=False)

    def ahead(made_for: GuestSpec) -> Path:
        upper = driver._prepare_overlay(dataclasses.replace(made_for, agent_token=""), basefs, ahead=True)
        (upper / "marker").write_text("made ahead\n")
        return upper

    upper = ahead(spec)
    etc, note = upper / "etc", upper.parent / LAYER_AHEAD
    assert not (etc / "deckard/agent-token").exists() and not (etc / "deckard/display-passwd.user").exists()
    assert "alice:x:10001" in (etc / "passwd").read_text() and (etc / "hostname").read_text() == "dkabc123-42\n"
    assert (etc / "deckard/no-glx").exists() and (etc / "hostname").stat().st_uid == driver.id_base
    assert (note.stat().st_uid, stat.S_IMODE(note.stat().st_mode)) == (0, 0o600)

    assert driver._prepare_overlay(spec, basefs) == upper
    assert (upper / "marker").exists() and not note.exists()  # taken: the layer is this start's now
    assert (etc / "deckard/agent-token").read_text() == "tok\n"
    user_secret = etc / "deckard/display-passwd.user"
    assert (user_secret.stat().st_uid, stat.S_IMODE(user_secret.stat().st_mode)) == (driver.id_base + 10001, 0o400)
    assert user_secret.read_bytes() == (etc / "deckard/display-passwd").read_bytes()
    assert (etc / "deckard/agent-token").stat().st_uid == driver.id_base

    driver._prepare_overlay(spec, basefs)  # a used layer: made anew, as every layer an OSF does not keep
    assert not (upper / "marker").exists()

    for other in (
        make_spec(desktop_id=7, glx=False, user_login="bob", user_uid=10002),
        make_spec(desktop_id=7, glx=False, ip="10.0.0.43"),
        make_spec(desktop_id=7, glx=True),
        make_spec(desktop_id=7, glx=False, first_start=True),
    ):
        ahead(spec)
        driver._prepare_overlay(other, basefs)
        assert not (upper / "marker").exists() and not note.exists()
        assert (etc / "hostname").read_text() == "dkabc123-42\n"
        assert f"{other.user_login}:x:{other.user_uid}" in (etc / "passwd").read_text()
        assert (etc / "deckard/no-glx").exists() != other.glx

    kept = make_spec(desktop_id=7, glx=False, keep_overlay=True, user_login="bob", user_uid=10002)
    ahead(spec)
    driver._prepare_overlay(kept, basefs)  # kept as it is, but used now: the note goes
    assert (upper / "marker").exists() and not note.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the layer is handed to the desktop's root (chown): needs root")
async def test_a_guest_stopped_by_this_node_gets_its_next_layer_made_ahead(tmp_path: Path) -> None:
    paths = FarmPaths(tmp_path / "farm")
    paths.make()
    driver = ContainerDriver(paths)
    _image_etc(paths.basefs / f"7-u{driver.id_base}")
    spec = make_spec(desktop_id=7, image_id=7)
    driver._prepare_next(spec.guest_name)  # a guest this node did not start (it restarted since): nothing
    await driver.close()
    assert not paths.overlay(7).exists()
    for unlike in (dataclasses.replace(spec, keep_overlay=True), dataclasses.replace(spec, warm=True)):
        driver._remember(unlike)  # a kept layer stays as it is; a warm guest's layer goes with it
        driver._prepare_next(spec.guest_name)
        await driver.close()
        assert not paths.overlay(7).exists()
    driver._remember(spec)
    driver._prepare_next(spec.guest_name)
    await driver.close()
    assert (paths.overlay(7) / LAYER_AHEAD).is_file()
    assert not (paths.overlay(7) / "upper/etc/deckard/agent-token").exists()  # no secret kept for a stopped guest


@pytest.mark.skipif(os.geteuid() != 0, reason="the layer is handed to the desktop's root (chown): needs root")
def test_a_kept_layer_cannot_steer_the_nodes_writes_through_links_its_root_left(tmp_path: Path) -> None:
    """Root in a desktop with a kept layer plants links where the node writes before the next start: the node
    replaces them and never writes, reads or changes modes through them (a link resolves on the host)."""
    paths = FarmPaths(tmp_path / "farm")
    paths.make()
    basefs = _image_etc(tmp_path / "basefs")
    victim = tmp_path / "host-file"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    spec = make_spec(desktop_id=7, keep_overlay=True, dns_search="corp.example")
    driver = ContainerDriver(paths)
    etc = driver._prepare_overlay(spec, basefs) / "etc"  # the first start makes the layer
    user_secret = etc / "deckard/display-passwd.user"  # the boot script's Xvnc reads it as the user: theirs, read-only
    assert user_secret.read_bytes() == (etc / "deckard/display-passwd").read_bytes()
    assert stat.S_IMODE(user_secret.stat().st_mode) == 0o400
    assert (user_secret.stat().st_uid, user_secret.stat().st_gid) == (driver.id_base + 10001,) * 2
    for name in ("hostname", "passwd", "deckard/agent-token", "deckard/display-passwd.user"):
        (etc / name).unlink()
        (etc / name).symlink_to(victim)
    (etc / ".shadow.deckard").symlink_to(victim)
    driver._prepare_overlay(spec, basefs)
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert not (etc / "hostname").is_symlink() and (etc / "hostname").read_text() == "dkabc123-42\n"
    assert (etc / "deckard/agent-token").read_text() == "tok\n"
    assert not user_secret.is_symlink() and user_secret.stat().st_size == 8
    assert (etc / "passwd").is_symlink()  # the desktop's own business: no account written through it
    assert "search corp.example" in (etc / "resolv.conf").read_text()

    (etc / "deckard").rename(tmp_path / "moved")
    (etc / "deckard").symlink_to(tmp_path)
    with pytest.raises(DriverError) as caught:
        driver._prepare_overlay(spec, basefs)
    assert caught.value.code == "overlay_invalid"
    assert not (tmp_path / "agent-token").exists()


def test_the_cgroup2_mount_is_found_with_whether_moves_are_cheap_already() -> None:
    """``favordynmods`` is cgroup2's option (a hybrid host has cgroup2 beside its v1 hierarchies); v1-only: None."""
    hybrid = (
        "cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n"
    )
    assert favordynmods_mount(hybrid) == ("/sys/fs/cgroup/unified", False)
    assert favordynmods_mount("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,favordynmods 0 0\n") == ("/sys/fs/cgroup", True)
    assert favordynmods_mount("cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n") is None


def test_a_noted_init_is_running_only_while_that_very_process_lives(tmp_path: Path) -> None:
    """The driver reads a guest's state from the init it noted at start (no lxc-info at every heartbeat): the
    note names the pid and its network namespace, so a pid given to another process, a torn note or none at
    all send the caller to LXC (None)."""
    assert recorded_init(tmp_path) is None  # no note
    record_init(tmp_path, os.getpid())
    assert recorded_init(tmp_path) == os.getpid()
    pid, netns = (tmp_path / INIT_FILE).read_text().split()
    (tmp_path / INIT_FILE).write_text(f"{pid} {int(netns) + 1}\n")  # the pid now in another namespace: reused
    assert recorded_init(tmp_path) is None
    (tmp_path / INIT_FILE).unlink()
    child = subprocess.Popen(["true"])
    child.wait()
    record_init(tmp_path, child.pid)  # gone before the note: nothing is written
    assert not (tmp_path / INIT_FILE).exists() and recorded_init(tmp_path) is None
    (tmp_path / INIT_FILE).write_text("12")  # torn
    assert recorded_init(tmp_path) is None
