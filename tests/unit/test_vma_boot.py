"""A container's boot script (``drivers/agent_code.boot_script``) and the agent's adoption of the Xvnc it starts.

The script runs as a desktop's init (the e2e tests boot every container with it); here: that it is valid ``sh``,
starts the display with the agent's own command line and environment, waits for it (bounded) with stand-ins for
setpriv, Xvnc and the agent, and hands Xvnc's pid to the agent.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deckard.drivers.agent_code import (
    AGENT_PYC_COMMAND,
    BOOT_SCRIPT,
    XVNC_READY_WAIT_S,
    agent_command,
    boot_script,
    refresh_boot_script,
)
from deckard.vma import agent as vma


def test_the_boot_script_is_valid_sh_and_starts_the_agents_display_then_the_agent() -> None:
    script = boot_script(AGENT_PYC_COMMAND)
    assert subprocess.run(["sh", "-n"], input=script.encode(), check=False).returncode == 0
    xvnc = vma.xvnc_args(vma.DISPLAY, vma.DEFAULT_GEOMETRY, vma.BOOT_DISPLAY_SECRET_FILE, glx=True)
    assert shlex.join(xvnc) + " $glx -displayfd 3" in script
    assert 'setpriv --reuid="$uid" --regid="$uid" --clear-groups' in script
    assert "setsid" not in script and "install " not in script and "env -i" not in script  # no exec but setpriv
    account = vma.pwd.struct_passwd(("$login", "x", 0, 0, "", "/home/$login", "/bin/bash"))
    for key, value in vma.user_env(account).items():  # the environment the agent gives Xvnc, for this login
        assert f'{key}="{value}"' in script
    assert script.rstrip().endswith(f'exec {AGENT_PYC_COMMAND} --display-for "$login:$uid" $xvnc')


FAKE_SETPRIV = """#!/bin/sh
while [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
"""
# stands for Xvnc: ready (its display number on -displayfd's descriptor after a moment), dead at once, or hung
FAKE_XVNC = """#!/bin/sh
echo "$@" >"$XVNC_ARGS"
case "$FAKE_XVNC" in
  ready) sleep 0.3; echo 0 >&3; exec sleep 30 ;;
  dead) exit 1 ;;
  hung) exec sleep 30 ;;
esac
"""


def run_boot(
    tmp_path: Path, behaviour: str, *, secret: bool = True, glx: bool = True
) -> tuple[float, list[str], int | None]:
    """The boot script with its paths under ``tmp_path`` and stand-ins for setpriv, Xvnc and the agent: how long
    until the agent started, its arguments, and the pid the script wrote for Xvnc (whose arguments are left in
    ``tmp_path/xvnc.args``).  Without ``glx`` the node's file that turns OpenGL off is there."""
    bin_dir, run, x11 = tmp_path / "bin", tmp_path / "run", tmp_path / "x11"
    for path in (bin_dir, run, x11):
        path.mkdir()
    for name, text in (("setpriv", FAKE_SETPRIV), ("Xvnc", FAKE_XVNC)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    if secret:
        (tmp_path / "secret").write_bytes(bytes(8))
    if not glx:
        (tmp_path / "no-glx").write_bytes(b"")
    agent = tmp_path / "agent"
    agent.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/agent.args\n')
    agent.chmod(0o755)
    script = (
        boot_script(str(agent))
        .replace(vma.BOOT_DISPLAY_SECRET_FILE, str(tmp_path / "secret"))
        .replace(str(vma.RUN_DIR), str(run))
        .replace(vma.X11_SOCKET_DIR, str(x11))
        .replace(vma.NO_GLX_FILE, str(tmp_path / "no-glx"))
        .replace('PATH="/usr/local/bin:/usr/bin:/bin"', f'PATH="{bin_dir}:/usr/bin:/bin"')
    )
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_XVNC": behaviour, "XVNC_ARGS": str(tmp_path / "xvnc.args")}
    t0 = time.monotonic()
    subprocess.run(["sh", "-c", script, "boot", "alice", str(os.getuid())], env=env, check=True, timeout=20)
    took = time.monotonic() - t0
    pid_file = run / "xvnc.pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return took, (tmp_path / "agent.args").read_text().split(), pid


def test_the_boot_script_becomes_the_agent_once_xvnc_is_ready_and_hands_it_xvncs_pid(tmp_path: Path) -> None:
    took, args, pid = run_boot(tmp_path, "ready")
    assert pid is not None and args == ["--display-for", f"alice:{os.getuid()}", "--xvnc-pid", str(pid)]
    assert 0.3 <= took < XVNC_READY_WAIT_S  # after the display said it was ready, not before


def test_the_node_can_turn_opengl_off_for_the_display_the_boot_script_starts(tmp_path: Path) -> None:
    with_glx, without = tmp_path / "with", tmp_path / "without"
    with_glx.mkdir()
    without.mkdir()
    run_boot(with_glx, "ready")
    run_boot(without, "ready", glx=False)
    assert "-extension GLX" not in (with_glx / "xvnc.args").read_text()
    assert "-extension GLX -displayfd 3" in (without / "xvnc.args").read_text()


def test_the_agent_starts_xvnc_without_opengl_where_the_node_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = tmp_path / "no-glx"
    monkeypatch.setattr(vma, "NO_GLX_FILE", str(flag))
    monkeypatch.setattr(vma, "SOFTWARE_CPU", False)
    assert vma.glx_wanted()
    flag.write_bytes(b"")
    assert not vma.glx_wanted()
    monkeypatch.setattr(vma, "SOFTWARE_CPU", True)
    flag.unlink()
    assert not vma.glx_wanted()  # an emulated CPU never gets it
    args = vma.xvnc_args(":0", "800x600", "/secret", glx=False)
    assert args[-2:] == ["-extension", "GLX"] and "GLX" not in vma.xvnc_args(":0", "800x600", "/secret", glx=True)


def test_an_older_boot_script_is_rewritten_with_its_owner_and_a_current_one_left(tmp_path: Path) -> None:
    script = tmp_path / BOOT_SCRIPT.lstrip("/")
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n# an older node's\n")
    os.chown(script, 4321, 4321)
    assert refresh_boot_script(tmp_path)
    assert script.read_text() == boot_script(agent_command(tmp_path)) and script.stat().st_uid == 4321
    assert script.stat().st_mode & 0o777 == 0o755 and not list(script.parent.glob("*.new"))
    assert not refresh_boot_script(tmp_path)  # current: untouched
    assert not refresh_boot_script(tmp_path / "none")  # an image without one


def test_an_xvnc_that_dies_at_start_holds_the_agent_back_only_so_long(tmp_path: Path) -> None:
    took, args, pid = run_boot(tmp_path, "dead")  # the agent adopts a dead Xvnc: it starts the display itself
    assert pid is not None and args[-2:] == ["--xvnc-pid", str(pid)] and took < XVNC_READY_WAIT_S + 1.5


def test_a_hung_xvnc_holds_the_agent_back_only_so_long(tmp_path: Path) -> None:
    took, args, pid = run_boot(tmp_path, "hung")
    assert pid is not None and args[-2:] == ["--xvnc-pid", str(pid)]
    assert XVNC_READY_WAIT_S <= took < XVNC_READY_WAIT_S + 1.5


def test_without_the_users_secret_the_agent_starts_the_display(tmp_path: Path) -> None:
    _took, args, pid = run_boot(tmp_path, "ready", secret=False)
    assert pid is None and args == ["--display-for", f"alice:{os.getuid()}"]


def test_an_adopted_child_is_polled_signalled_and_reaped_like_a_spawned_one() -> None:
    spawned = subprocess.Popen(["sleep", "30"], start_new_session=True)  # stands for the boot script's Xvnc
    children = vma.Children()
    adopted = children.adopt(spawned.pid, "Xvnc")
    try:
        assert adopted.poll() is None and vma._alive(adopted)
        assert repr(adopted).startswith("<Adopted")
        vma.os.killpg(adopted.pid, signal.SIGTERM)
        assert adopted.wait(timeout=10) == -signal.SIGTERM
        assert not vma._alive(adopted)
        children.forget(adopted)
        spawned.returncode = adopted.returncode  # reaped through the adoption
    finally:
        if adopted.returncode is None:
            spawned.kill()
            spawned.wait()


def test_an_adopted_xvnc_outside_a_group_of_its_own_is_signalled_by_its_pid() -> None:
    """The boot script's Xvnc shares the init's process group: ``signal_group`` reaches it all the same (and the
    group it is in, ours here, is left alone: its pid names no group)."""
    spawned = subprocess.Popen(["sleep", "30"])  # in pytest's process group, as the boot script's Xvnc is in init's
    adopted = vma.Children().adopt(spawned.pid, "Xvnc")
    try:
        vma.signal_group(adopted, signal.SIGTERM)
        assert adopted.wait(timeout=10) == -signal.SIGTERM
        spawned.returncode = adopted.returncode
    finally:
        if adopted.returncode is None:
            spawned.kill()
            spawned.wait()
