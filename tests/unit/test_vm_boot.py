"""The VM driver's pure parts: the initrd it makes, the init it runs, the config disk's files, QEMU's command."""

from __future__ import annotations

import lzma
import stat
import subprocess
from pathlib import Path

import pytest

from deckard.drivers.base import GuestSpec
from deckard.drivers.firewall import render_port_guard
from deckard.drivers.vm import VmDriver, tap_name
from deckard.drivers.vm_boot import (
    INITRD_MODULES,
    REQUIRED_MODULES,
    GuestConf,
    config_files,
    cpio_newc,
    initrd_image,
    render_init,
    vmlinux_from_bzimage,
)
from deckard.model.errors import DriverError
from deckard.model.placement import serves
from deckard.model.vm_image import VM_MODULES, module_load_order
from deckard.runtime.paths import FarmPaths
from deckard.vma.agent import NO_GLX_FILE

MODULES_DEP = """\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko
kernel/fs/fat/fat.ko:
"""


def _cpio_entries(data: bytes) -> dict[str, tuple[int, bytes]]:
    out, at = {}, 0
    while True:
        assert data[at : at + 6] == b"070701"
        fields = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_len = fields[1], fields[6], fields[11]
        name_at = at + 110
        name = data[name_at : name_at + name_len - 1].decode()
        body_at = name_at + name_len + (-(110 + name_len) % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data[body_at : body_at + size])
        at = body_at + size + (-size % 4)


def test_cpio_is_the_newc_format_the_kernel_unpacks() -> None:
    data = cpio_newc(
        [("bin", stat.S_IFDIR | 0o755, b""), ("bin/x", stat.S_IFREG | 0o755, b"abc"), ("init", 0o100755, b"")]
    )
    entries = _cpio_entries(data)
    assert entries["bin/x"] == (stat.S_IFREG | 0o755, b"abc")
    assert stat.S_ISDIR(entries["bin"][0]) and "init" in entries


def test_modules_load_after_what_they_need() -> None:
    order = module_load_order(MODULES_DEP, ["virtio_pci", "virtio_blk", "ext4", "vfat", "absent"])
    names = [p.rsplit("/", 1)[-1] for p in order]
    assert names.index("virtio_ring.ko") < names.index("virtio.ko") < names.index("virtio_pci.ko")
    assert names.index("crc16.ko") < names.index("ext4.ko") and names.index("fat.ko") < names.index("vfat.ko")
    assert len(names) == len(set(names))


def test_the_initrd_loads_only_what_the_image_keeps() -> None:
    assert set(INITRD_MODULES) <= set(VM_MODULES)  # the builder prunes every other module away
    assert set(INITRD_MODULES) >= REQUIRED_MODULES


def _rootfs(tmp_path: Path, *, busybox: bool = True, modules: str = MODULES_DEP) -> Path:
    root = tmp_path / "rootfs"
    mods = root / "lib/modules/6.1.0-test"
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text(modules)
    for line in modules.splitlines():
        path = mods / line.split(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x7fELF module " + path.name.encode())
    if busybox:
        (root / "bin").mkdir()
        (root / "bin/busybox").write_bytes(b"\x7fELF" + bytes(600_000))
    return root


def test_initrd_has_busybox_the_modules_and_the_init(tmp_path: Path) -> None:
    entries = _cpio_entries(initrd_image(_rootfs(tmp_path), "6.1.0-test"))
    assert entries["bin/busybox"][0] & 0o755 == 0o755
    assert entries["lib/modules/ext4.ko"][1].startswith(b"\x7fELF")
    init = entries["init"][1].decode()
    assert init.index("insmod /lib/modules/virtio_ring.ko") < init.index("insmod /lib/modules/virtio_blk.ko")


def test_an_image_without_busybox_or_disk_modules_cannot_boot(tmp_path: Path) -> None:
    with pytest.raises(DriverError) as e:
        initrd_image(_rootfs(tmp_path / "a", busybox=False), "6.1.0-test")
    assert e.value.code == "image_not_bootable"
    no_ext4 = "\n".join(line for line in MODULES_DEP.splitlines() if "ext4" not in line)
    with pytest.raises(DriverError) as e:
        initrd_image(_rootfs(tmp_path / "b", modules=no_ext4), "6.1.0-test")
    assert e.value.code == "image_not_bootable" and "ext4" in e.value.message


def test_init_finds_disks_by_serial_and_hands_over_to_the_agent() -> None:
    init = render_init(["kernel/fs/ext4/ext4.ko"])
    assert "deckard-root" in init and "deckard-home" in init and "deckard-config" in init
    assert "agent=/usr/local/sbin/deckard-vma" in init  # or its bytecode, when the node compiled it
    assert 'switch_root /newroot $agent --machine vm --display-for "$USER_LOGIN:$USER_UID"' in init
    assert init.index("53ef") < init.index("mkfs.ext4")  # formats only a home that has no file system yet


def test_the_init_leaves_the_agent_word_when_the_display_has_no_opengl(tmp_path: Path) -> None:
    """``display.glx`` off reaches a VM's agent as a file its init leaves on the root disk, and only then (a root
    disk keeps the last start's: it goes when the setting is back on)."""
    lines = [line for line in render_init([]).splitlines() if NO_GLX_FILE in line]
    script = "\n".join(lines).replace("/newroot", str(tmp_path)).replace("$bb ", "")
    flag = tmp_path / NO_GLX_FILE.lstrip("/")
    flag.parent.mkdir(parents=True)
    for glx, present in (("0", True), ("1", False), ("0", True)):
        subprocess.run(["sh", "-c", script], env={"GLX": glx, "PATH": "/usr/bin:/bin"}, check=False)
        assert flag.is_file() == present, glx
    on, off = (GuestConf("dk1-2", "10.0.0.5", 24, "10.0.0.1", "ada", 70001, glx=glx).render() for glx in (True, False))
    assert "GLX=1\n" in on and "GLX=0\n" in off


def test_guest_conf_quotes_every_value_for_the_shell() -> None:
    conf = GuestConf("dk1-2", "10.0.0.5", 24, "10.0.0.1", "ada", 70001, dns_search="a.test; rm -rf /")
    assert "DNS_SEARCH='a.test; rm -rf /'" in conf.render()
    files = config_files(conf, agent_token="tok", display_secret=b"12345678")
    assert files["deckard/agent-token"] == b"tok\n" and files["deckard/display-passwd"] == b"12345678"
    assert b"dk1-2" in files["meta-data"]
    seeded = config_files(conf, agent_token="tok", display_secret=b"x" * 8, extra={"meta-data": b"instance-id: i\n"})
    assert seeded["meta-data"] == b"instance-id: i\n"


def test_the_kernel_is_found_inside_a_bzimage() -> None:
    elf = b"\x7fELF" + bytes(1000)
    fake = b"MZ setup code \xfd7zXZ\x00 not a stream " + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"trailer"
    assert vmlinux_from_bzimage(fake) == elf
    assert vmlinux_from_bzimage(b"no kernel here") is None


def _spec(tmp_path: Path) -> GuestSpec:
    return GuestSpec(
        desktop_id=7,
        guest_name="dkabc123-7",
        image_id=1,
        image_path=tmp_path / "image.tar.zst",
        ip="10.9.0.20",
        prefix_len=24,
        gateway="10.9.0.1",
        mac="54:52:00:09:00:14",
        bridge="dkb0",
        memory_mib=1024,
        cpus=2,
        user_login="ada",
        user_uid=70001,
        home_dir=tmp_path / "homes/t/ada",
        agent_token="secret-token-value",
        driver="vm",
    )


def test_qemu_runs_confined_and_never_sees_a_secret_on_its_command_line(tmp_path: Path) -> None:
    driver = VmDriver(FarmPaths(tmp_path), accel="tcg")
    base = tmp_path / "base"
    base.mkdir()
    (base / "vmlinux").write_bytes(b"\x7fELF")
    spec = _spec(tmp_path)
    args = driver._command(spec, base, tmp_path / "o.qcow2", tmp_path / "h.qcow2", tmp_path / "c.img", "tdk7", "tcg")
    line = " ".join(args)
    assert "secret-token-value" not in line  # the token travels on the root-only config disk
    assert f"-runas {driver.uid}:{driver.uid}" in line and "-sandbox on" in line
    assert "-m 1024" in line and "-smp 2" in line and f"mac={spec.mac}" in line
    assert "serial=deckard-root" in line and "serial=deckard-home" in line and "serial=deckard-config" in line
    assert "readonly=on" in line and "pvpanic" in line and "bootindex" not in line  # -kernel boots, not firmware
    assert "shutdown=pause" in line and "panic=pause" in line


def test_tap_names_fit_the_kernel_limit() -> None:
    assert tap_name("dkabc123-7") == "tdkabc1237"
    assert len(tap_name("dkabcdef-1234567890")) <= 15


def test_the_port_guard_admits_only_the_guest_own_addresses() -> None:
    text = render_port_guard("tdk7", "54:52:00:09:00:14", "10.9.0.20")
    assert 'iifname "tdk7" ether saddr != 54:52:00:09:00:14 drop' in text
    assert 'iifname "tdk7" ip saddr != 10.9.0.20 drop' in text and "arp saddr ip != 10.9.0.20 drop" in text


def test_a_node_with_several_drivers_serves_each_of_them() -> None:
    assert serves("container,vm", "vm") and serves("container,vm", "container") and serves("fake", "vm")
    assert not serves("container", "vm") and not serves("vm", "container")


def test_a_failed_boot_is_explained_by_the_panic_line_not_the_register_dump() -> None:
    from deckard.node.daemon import console_summary

    console = (
        "deckard-init: starting the agent at 4.1 s\n"
        "agent: giving up\n"
        "[    6.4] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000300\n"
        "[    6.4] CPU: 0 PID: 1 Comm: deckard-vma\n"
        "[    6.5] R13: 00007ffdcd19c020 R14: 000055c28cf1ce38\n"
        "[    6.5] Kernel Offset: disabled\n"
    )
    said = console_summary(console)
    assert said.startswith("deckard-init: starting the agent") and "agent: giving up" in said
    assert said.endswith("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000300")
    assert console_summary("one\ntwo\n\nthree\nfour\n") == "two | three | four"
    assert console_summary("") == ""


def test_the_agent_is_compiled_only_for_the_image_own_python(tmp_path: Path) -> None:
    import importlib.util
    import subprocess
    import sys

    from deckard.drivers.agent_code import AGENT, AGENT_PYC, MODULE_DIR, agent_command, precompile_agent

    root = tmp_path / "rootfs"
    (root / "usr/local/sbin").mkdir(parents=True)
    (root / "usr/local/sbin/deckard-vma").write_text("#!/usr/bin/python3\nimport sys\nprint('agent', sys.argv[1:])\n")
    sound = root / MODULE_DIR.lstrip("/") / "sound.py"
    sound.parent.mkdir(parents=True)
    sound.write_text("RATE = 48000\n")
    cache = root / "usr/lib/python3.11/__pycache__"
    cache.mkdir(parents=True)
    (cache / "os.cpython-311.pyc").write_bytes(b"\x00\x00\r\n" + bytes(12))  # another Python's magic
    assert not precompile_agent(root) and not (root / AGENT_PYC.lstrip("/")).exists()
    assert agent_command(root) == AGENT  # no bytecode: the script, compiled by the guest at each start
    (cache / "os.cpython-311.pyc").write_bytes(importlib.util.MAGIC_NUMBER + bytes(12))
    assert precompile_agent(root)
    pyc = root / AGENT_PYC.lstrip("/")
    assert pyc.read_bytes()[:4] == importlib.util.MAGIC_NUMBER
    assert agent_command(root) == f"/usr/bin/python3 -I -S {AGENT_PYC}"
    ran = subprocess.run([sys.executable, str(pyc), "--display-for", "a:1"], capture_output=True, text=True)
    assert ran.stdout == "agent ['--display-for', 'a:1']\n"  # the bytecode runs as the script did
    assert (sound.parent / "__pycache__" / f"sound.{sys.implementation.cache_tag}.pyc").is_file()
