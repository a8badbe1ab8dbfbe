"""Where an image keeps the guest agent, and the agent's bytecode, compiled once per unpacked image.

The agent is one Python file in an image (``images/builder.py``); run as a script, the image's Python compiles
its 2,000-odd lines at every start (30 ms here, seconds under a software CPU).  Whoever unpacks an image for
desktops (the container driver's ``basefs``, the VM driver's root disk) compiles it once into :data:`AGENT_PYC`,
with its modules beside it, when this Python's bytecode is the image's, and starts the agent from it.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import py_compile
import shlex
import stat
from pathlib import Path

AGENT = "/usr/local/sbin/deckard-vma"
AGENT_PYC = "/usr/local/lib/deckard-vma.pyc"
MODULE_DIR = "/usr/local/lib/deckard-vma"  # the agent's other modules: vma/agent.py MODULE_DIR loads them
AGENT_MODULES = ("sound", "shares", "nx_print")  # vma/<name>.py, installed as MODULE_DIR/<name>.py
BOOT_SCRIPT = f"{MODULE_DIR}/boot"  # a desktop container's init: the user's Xvnc, then the agent (boot_script)
NX_SLAVE = f"{MODULE_DIR}/nx-slave"  # vma/nx_slave.py, nxagent's slave command (vma/agent.py NX_SLAVE_CMD)
NX_PRINT_BACKEND = "/usr/lib/cups/backend/deckard-nx"  # vma/nx_print.py again, as CUPS runs it
OPENER = "/usr/local/bin/deckard-open"  # vma/opener.py: a desktop shell's menus start the user's programs with it
PYTHON = "/usr/bin/python3"
# the agent needs only the standard library: no ``site`` (the image's dist-packages and their .pth files, 4 ms of
# the interpreter's 17 ms start in the minimal image) and no environment variables or user directories
PYTHON_FLAGS = "-I -S"
AGENT_PYC_COMMAND = f"{PYTHON} {PYTHON_FLAGS} {AGENT_PYC}"  # the agent from its bytecode (containers and VMs)


def precompile_agent(rootfs: Path) -> bool:
    """Compile the image's agent to :data:`AGENT_PYC` (and its modules to their ``__pycache__``) when this
    Python's bytecode is the image's (same magic number as the image's own standard library)."""
    source = rootfs / AGENT.lstrip("/")
    stdlib = sorted((rootfs / "usr/lib").glob("python3.*/__pycache__/os.cpython-*.pyc"))
    if not source.is_file() or not stdlib or stdlib[-1].read_bytes()[:4] != importlib.util.MAGIC_NUMBER:
        return False
    target = rootfs / AGENT_PYC.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        py_compile.compile(str(source), cfile=str(target), doraise=True)
        for name in AGENT_MODULES:
            module = rootfs / MODULE_DIR.lstrip("/") / f"{name}.py"
            if module.is_file():  # where the agent's import looks for it, checked against the source's time and size
                compiled = Path(importlib.util.cache_from_source(str(module)))
                py_compile.compile(str(module), cfile=str(compiled), doraise=True)
                compiled.chmod(0o644)
                compiled.parent.chmod(0o755)
    except py_compile.PyCompileError:
        return False
    target.chmod(0o644)
    return True


def agent_command(rootfs: Path) -> str:
    """How to start the agent of this unpacked image: from its bytecode when it has some."""
    return AGENT_PYC_COMMAND if (rootfs / AGENT_PYC.lstrip("/")).is_file() else AGENT


# the longest the boot script holds the agent back for its Xvnc, which then adopts it: long enough for a loaded node's
# Xvnc to start, and what one that died at start costs (the wait's timer holds the pipe Xvnc would have closed)
XVNC_READY_WAIT_S = 1


def boot_script(agent: str) -> str:
    """A container's init for a desktop whose user is known at boot (``$1`` login, ``$2`` uid): it starts the
    user's Xvnc as the agent would (same command line and session; the user's copy of the display secret, which the
    node wrote) and becomes the agent once Xvnc is ready (``-displayfd``: it writes its display number then; at most
    :data:`XVNC_READY_WAIT_S`), which adopts it (``--xvnc-pid``).  The broker dials that display while the agent
    starts (``desktops.display_at``), so Xvnc's start comes first and has the CPU to itself: nothing but ``setpriv``
    is exec'd before it (its directories are the container's mounts, ``lxc_config.render_config``), and the wait is
    a ``read`` on a pipe, not a polling loop of ``sleep`` programs.  Xvnc stays in the init's process group (the
    agent signals an adopted Xvnc by its pid as well).  Without ``setpriv``, the secret or the directories, the
    agent starts Xvnc itself."""
    from deckard.vma import agent as vma  # the agent's own names: one definition of the display

    account = pwd.struct_passwd(("$login", "x", 0, 0, "", "/home/$login", "/bin/bash"))  # as write_account has it
    env = " ".join(f'{key}="{value}"' for key, value in vma.user_env(account).items())  # sh expands "$login"
    secret = vma.BOOT_DISPLAY_SECRET_FILE
    xvnc = shlex.join(vma.xvnc_args(vma.DISPLAY, vma.DEFAULT_GEOMETRY, secret, glx=True))
    run, pid_file = vma.RUN_DIR, f"{vma.RUN_DIR}/xvnc.pid"
    return f"""#!/bin/sh
# deckard: a desktop container's init, written when the node unpacked the image (drivers/agent_code.py)
login="$1" uid="$2" xvnc="" glx=""
[ -f {vma.NO_GLX_FILE} ] && glx="-extension GLX"
if command -v setpriv >/dev/null && [ -f {secret} ] && [ -d {run} ] && [ -d {vma.X11_SOCKET_DIR} ]; then
  {{ {env} setpriv --reuid="$uid" --regid="$uid" --clear-groups \\
      {xvnc} $glx -displayfd 3 3>&1 </dev/null >>{run}/xvnc.log 2>&1 &
    echo $! >{pid_file}
    (sleep {XVNC_READY_WAIT_S}; echo) & }} | {{ read -r _; }}
  read -r pid <{pid_file} && xvnc="--xvnc-pid $pid"
fi
exec {agent} --display-for "$login:$uid" $xvnc
"""


def install_boot_script(rootfs: Path) -> None:
    """Write :data:`BOOT_SCRIPT` into an unpacked image for :func:`agent_command`'s agent."""
    target = rootfs / BOOT_SCRIPT.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(boot_script(agent_command(rootfs)))
    target.chmod(0o755)


def refresh_boot_script(rootfs: Path) -> bool:
    """Rewrite an unpacked image's boot script when this node's differs (an image unpacked by an older node): same
    owner, one rename (a container booting meanwhile reads the old one or the new).  False when it was current or
    the image has none (its agent starts the display itself)."""
    target = rootfs / BOOT_SCRIPT.lstrip("/")
    try:
        st = target.lstat()
        current = target.read_text() if stat.S_ISREG(st.st_mode) else None
    except OSError:
        return False
    wanted = boot_script(agent_command(rootfs))
    if current is None or current == wanted:
        return False
    fresh = target.with_name(target.name + ".new")
    fresh.write_text(wanted)
    os.chown(fresh, st.st_uid, st.st_gid)
    fresh.chmod(0o755)
    fresh.replace(target)
    return True


def boot_command(rootfs: Path) -> str | None:
    """A container's init command when its image has the boot script (followed by the login and uid)."""
    return f"/bin/sh {BOOT_SCRIPT}" if (rootfs / BOOT_SCRIPT.lstrip("/")).is_file() else None
