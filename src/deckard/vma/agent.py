"""deckard-vma: the guest agent that runs inside every desktop (QVD's VMA).

It is PID 1 of a container, so it also does the little an init must do: set the hostname, make sure the
pseudo filesystems are mounted, reap every orphan, and power off cleanly on SIGPWR/SIGTERM.  Then it
serves a small token-authenticated HTTP RPC on port 3030 that the node and the broker call:

    GET|POST /vma/<method>?<params>   Authorization: Bearer <token from /etc/deckard/agent-token>
    -> {"ok": true, ...} | {"ok": false, "error": {"code": ..., "message": ...}}

    ping, x_state, x_start(user, uid[, geometry][, keyboard][, protocol=nx, nx_*, timezone]), x_stop, poweroff, expire,
    spy_notice(admin[, interactive]), idle, session_notice(reason, action, in_s), exec(command[, user][, timeout])

    GET /files/list?login=&dir=[&hidden=1], GET /files/get?login=&path=, PUT /files/put?login=&path=
    -> the desktop user's files, read and written as that user (see FILE_WORKER)

X states follow QVD: stopped, provisioning, starting, listening, connected, stopping ("connected" means an
established TCP connection on the VNC port); an NX session (:class:`NxSession`, for QVD's clients) adds
suspending and suspended, read from nxagent's log as QVD's VMA reads them.  One session per desktop whatever the
client: an NX session is shown to VNC clients on an Xvnc of its own through a local nxproxy (:meth:`NxSession.
attach_vnc`), and an Xvnc session to QVD's clients by nxagent's shadow mode (``start_nx(shadow_of=...)``).
The display server is TigerVNC's Xvnc on :0 / port 5900,
with a jwm + xterm session, both run as the desktop's user.  Xvnc requires VNC authentication with the
desktop's display secret, which the node writes to /etc/deckard/display-passwd and only the broker knows:
another desktop or process that reaches the port cannot take the display.

``idle`` says how long the user has not typed nor moved the mouse (the X server's MIT-SCREEN-SAVER extension),
so the node can apply the session policies; ``session_notice`` tells the user on their display what a policy
will do and when.

In an image that has PulseAudio (``standard``), each session gets a sound server run as its user, and
``GET /sound?login=`` streams what it plays as Opus (``vma/sound.py``, loaded from beside the agent).

In an image that has CUPS (``standard``), the agent also runs cupsd, on its unix socket only, with one queue,
``PDF``: what the user prints becomes a PDF in ``~/PDF`` (see :class:`PdfPrinter`).

The agent uses the standard library only and imports nothing from deckard, so an image needs nothing but
``python3`` and the file itself (the image builder installs it as /usr/local/sbin/deckard-vma).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # run as the guest's init: http.server would import ssl (a quarter of a second under TCG) for nothing
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

import argparse
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import pwd
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # loaded at first use (handler_class)
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODULE_DIR = "/usr/local/lib/deckard-vma"  # where an image has the agent's other modules (images/builder.py)
PULSEAUDIO = "/usr/bin/pulseaudio"


def _load_module(name: str, needs: str = "") -> Any:
    """``vma/<name>.py``: a module of the package on the host, a file beside the agent in an image (the agent is
    one file there); None when the image lacks it or lacks ``needs`` (sound without an audio server is not
    compiled for nothing: a VM's boot under a software CPU would pay for it)."""
    import importlib
    import importlib.util

    try:
        return importlib.import_module(f"deckard.vma.{name}")
    except ImportError:
        pass

    path = f"{MODULE_DIR}/{name}.py"
    spec = importlib.util.spec_from_file_location(f"deckard_vma_{name}", path)
    if spec is None or spec.loader is None or not os.path.exists(path) or (needs and not os.path.exists(needs)):
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where dataclasses look a module's names up
    spec.loader.exec_module(module)
    return module


SOUND = _load_module("sound", needs=PULSEAUDIO)
SHARES = _load_module("shares")  # shared folders from QVD's clients (vma/shares.py)
NX_PRINT = _load_module("nx_print")  # a QVD client's printers as CUPS queues (vma/nx_print.py)
NX_SLAVE_CMD = f"{MODULE_DIR}/nx-slave"  # vma/nx_slave.py in an image: nxagent's slave command
VERSION = "0.1.0"
DEFAULT_PORT = 3030
DEFAULT_TOKEN_FILE = "/etc/deckard/agent-token"
DISPLAY_SECRET_FILE = "/etc/deckard/display-passwd"
# the user's own copy, written by the node for a container whose boot script starts the display (drivers/agent_code)
BOOT_DISPLAY_SECRET_FILE = "/etc/deckard/display-passwd.user"
DISPLAY = ":0"
VNC_PORT = 5900
X_START_TIMEOUT = 30.0  # a VM under a software CPU takes seconds to get its X server up
NX_DISPLAY = ":100"  # QVD's: nxagent on :100 waits for the proxy on 4000 + 100
NX_PORT = 4100
NX_INITIATING_TIMEOUT_S = 20.0  # QVD's timeouts: nxagent must listen within 20 s of its start (or resume) ...
NX_LISTENING_TIMEOUT_S = 10.0  # ... and a new session nobody connects to within 10 s is stopped
NX_SUSPEND_WAIT_S = 10.0  # a connected session being taken over has this long to suspend
VIEW_DISPLAY = ":99"  # the Xvnc on which an NX session is shown to VNC viewers (NxSession.attach_vnc)
DEFAULT_GEOMETRY = "1280x800"
BOOT_DISPLAY_WAIT_S = 35.0  # the longest x_start waits for the display started at boot (X_START_TIMEOUT and more)
SESSION_AFTER_SERVER_S = 2.0  # the longest a boot script's display waits for the agent's server to start its session
WARM_DISPLAY_USER = "nobody"  # whom a warm guest's Xvnc (and shell) run as, before a user takes the guest over
SESSION_SCRIPT = "/etc/deckard/xsession"
# an image's desktop shell alone (window manager, panel: nothing of a user's), which a warm guest draws before its
# user is known; the session script then runs with DECKARD_SHELL_UP=1 and starts only the user's part (docs/images.md)
SHELL_SCRIPT = "/etc/deckard/xshell"
# where deckard-open (vma/opener.py), run by a warm guest's shell, asks for a program of the display's user
LAUNCH_SOCKET = "/run/deckard/launch.sock"
MAX_LAUNCH_REQUEST = 16384
LAUNCH_REQUEST_S = 2.0  # the longest one caller of deckard-open holds the others up
EXPIRE_HOOK = "/etc/deckard/hooks/expire"
RUN_DIR = Path("/run/deckard")
X11_SOCKET_DIR = "/tmp/.X11-unix"
X_QUERY_TIMEOUT = 1.0
MAX_NOTICE_S = 30 * 86400
# used when the image carries no /etc/deckard/xsession
FALLBACK_SESSION = "xsetroot -solid '#2e4a62'; xterm &\nexec jwm\n"

MIN_UID, MAX_UID = 1000, 65533


def _software_cpu() -> bool:
    """A VM on QEMU's software CPU (TCG), whose model name says so; KVM guests see the host's CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return "QEMU TCG CPU" in f.read(4096)
    except OSError:
        return False


SOFTWARE_CPU = _software_cpu()
# written by the node when the desktop's OSF has OpenGL off (``display.glx``): Xvnc starts without GLX
NO_GLX_FILE = "/etc/deckard/no-glx"


def glx_wanted() -> bool:
    """OpenGL on the display: not on an emulated CPU (unusable there, and loading Mesa doubles Xvnc's start), nor
    where the node said no."""
    return not SOFTWARE_CPU and not os.path.isfile(NO_GLX_FILE)


MAX_EXEC_S = 30.0
MAX_EXEC_OUTPUT = 65536
LOGIN_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
IPV4_RE = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")
GEOMETRY_RE = re.compile(r"^(\d{3,4})x(\d{3,4})$")
KEYBOARD_RE = re.compile(r"^[a-z]{2,3}(\([a-z0-9_]{1,24}\))?$")  # an XKB layout (variant): us, de, fr(azerty)
TCP_ESTABLISHED = "01"

log = logging.getLogger("deckard-vma")


class AgentError(Exception):
    """An RPC failure with a stable code and the HTTP status it maps to."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class Children:
    """Spawns processes and reaps them; as PID 1 it also reaps every orphan reparented to it.

    The reaper peeks at exited children with ``waitid(WNOWAIT)``: a child we spawned is reaped through its
    ``Popen`` (so its return code stays correct), anything else is reaped directly.  Spawning holds the
    lock until the ``Popen`` is registered, so the reaper never mistakes a fast-exiting child for an orphan.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._spawned = threading.Event()

    def spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            proc: subprocess.Popen[bytes] = subprocess.Popen(args, **kwargs)
            self._procs[proc.pid] = proc
        self._spawned.set()
        return proc

    def adopt(self, pid: int, what: str) -> subprocess.Popen[bytes]:
        """A child this process inherited rather than spawned (``Adopted``), reaped through it like the others."""
        proc = Adopted(pid, what)
        with self._lock:
            self._procs[pid] = proc
        return proc

    def run(self, args: list[str], timeout: float = 30.0) -> tuple[int, str]:
        """Run a short command to completion; return (exit code, combined output)."""
        proc = self.spawn(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        finally:
            self.forget(proc)
        return proc.returncode, out.decode(errors="replace").strip()

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.pop(proc.pid, None)

    def reap_forever(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                self._spawned.wait(1.0)
                self._spawned.clear()
                continue
            except InterruptedError:
                continue
            if info is None:
                continue
            pid = info.si_pid
            with self._lock:
                proc = self._procs.get(pid)
            if proc is None:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            elif proc.poll() is not None:
                self.forget(proc)
            else:
                # its owner is inside Popen.wait() and will reap it in a moment
                time.sleep(0.01)


class Adopted(subprocess.Popen):  # type: ignore[type-arg]
    """A child the agent did not spawn: the Xvnc a container's boot script starts before the agent's interpreter
    (``--xvnc-pid``; the script then execs the agent, whose child it stays).  Popen's ``poll``, ``wait`` and
    signals work on any child by its pid; this sets only what they use instead of starting a process."""

    def __init__(self, pid: int, what: str) -> None:  # no Popen.__init__: the process runs already
        self.pid, self.args, self.returncode = pid, what, None
        self.stdin = self.stdout = self.stderr = None
        self._waitpid_lock = threading.Lock()
        self._child_created = False  # Popen.__del__ would otherwise look for what it never set


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """``sig`` to ``proc``'s process group, and to ``proc`` itself when it was adopted: the boot script starts its
    Xvnc without a group of its own (one exec less before the display)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    if isinstance(proc, Adopted):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            proc.send_signal(sig)


@contextlib.contextmanager
def undone_on_failure(undo: Callable[[], None], what: str) -> Iterator[None]:
    """Run the block; if it fails, ``undo()`` what it half did and raise: an AgentError as it is, anything else as
    ``x_start_failed`` ("``what``: <the error>")."""
    try:
        yield
    except AgentError:
        undo()
        raise
    except Exception as exc:
        undo()
        raise AgentError("x_start_failed", f"{what}: {exc}", 500) from exc


def _alive(proc: subprocess.Popen[bytes] | None) -> bool:
    return proc is not None and proc.poll() is None


def session_creds(account: pwd.struct_passwd, env: dict[str, str]) -> dict[str, Any]:
    """Popen's arguments for a process of the user's session: their uid, a new session, no terminal input."""
    return {
        "user": account.pw_uid,
        "group": account.pw_gid,
        "extra_groups": [],
        # Popen changes directory before it drops to the user, and root here may not enter the user's home
        "cwd": "/",
        "env": env,
        "stdin": subprocess.DEVNULL,
        "start_new_session": True,
    }


class XSession:
    """One user's display: Xvnc plus the desktop session, started and stopped as a unit."""

    display = DISPLAY

    def __init__(self, children: Children, sound: Any = None) -> None:
        self.claimed = False  # a client asked for this display (not only --display-for)
        self.children = children
        self.sound = sound  # sound.SoundServer: the session's audio server, started and stopped with it
        self.lock = threading.Lock()
        self.state = "stopped"
        self.user: str | None = None
        self.uid: int | None = None
        self.xvnc: subprocess.Popen[bytes] | None = None
        self.session: subprocess.Popen[bytes] | None = None
        # the environment of the user's programs when the display's shell is not theirs (a warm guest's, run as
        # WARM_DISPLAY_USER): what its menu asks for (``launch``) starts as the user, with this
        self.launch_env: dict[str, str] | None = None

    # -- state ---------------------------------------------------------------------------------------
    def current_state(self) -> str:
        if self.state == "listening" and vnc_connected(VNC_PORT):
            return "connected"
        return self.state

    def session_env(self, account: pwd.struct_passwd) -> dict[str, str]:
        """The environment of the display's X clients."""
        return user_env(account)

    def input_idle_ms(self) -> int | None:
        """Milliseconds since the user's last keyboard or mouse input; None without a display or an answer."""
        if self.state != "listening":
            return None
        try:
            return x_input_idle_ms(DISPLAY, X_QUERY_TIMEOUT)
        except (OSError, struct.error, IndexError) as exc:
            log.info("input idle time unknown: %s", exc)
            return None

    # -- start ---------------------------------------------------------------------------------------
    def prestart(self, geometry: str) -> None:
        """A warm guest's display (``--warm``): Xvnc up before anyone's account exists, run as ``nobody``, and the
        image's desktop shell on it when it has one (SHELL_SCRIPT), run as ``nobody`` too; the user who takes the
        guest over (``start``) gets only their session (or its user's part) started on it."""
        with self.lock:
            if self.state != "stopped":
                return
            self.state = "starting"
            with undone_on_failure(self._stop_locked, "could not start the warm display"):
                nobody = pwd.getpwnam(WARM_DISPLAY_USER)
                clear_display(DISPLAY)
                RUN_DIR.mkdir(parents=True, exist_ok=True)
                creds = session_creds(nobody, user_env(nobody))
                password_file = install_display_secret(nobody)
                self.xvnc = xvnc = spawn_xvnc(self.children, DISPLAY, geometry, password_file, creds, "xvnc.log")
                wait_for_greeting(VNC_PORT, time.monotonic() + X_START_TIMEOUT, lambda: _alive(xvnc))
                if os.path.exists(SHELL_SCRIPT):  # the desktop drawn before its user is known: nothing of theirs
                    self.session = self._spawn_session(SHELL_SCRIPT, {**creds, "env": {**creds["env"], "HOME": "/"}})
            self.state = "warm"

    def start(
        self, login: str, uid: int, geometry: str, keyboard: str = "", xvnc: subprocess.Popen[bytes] | None = None
    ) -> dict[str, Any]:
        """The user's display; ``xvnc``: theirs started already (the boot script's), to wait for and use."""
        t0 = time.monotonic()
        with self.lock:
            if self.state == "listening" and self.user == login and _alive(self.xvnc):
                if keyboard:  # a new connection may come with another keyboard than the display started with
                    self._set_keyboard(keyboard)
                return {"state": self.current_state(), "user": login, "already": True}
            warm = self.state == "warm" and _alive(self.xvnc)
            shell = self.session if warm and _alive(self.session) else None
            if self.state != "stopped" and not warm:
                self._stop_locked()
            elif warm and shell is None and self.session is not None:  # the shell died: the user's session runs one
                self.children.forget(self.session)
                self.session = None
            self.state = "provisioning"
            self.user, self.uid = login, uid
            with undone_on_failure(self._stop_locked, "could not start the display"):
                if xvnc is not None:
                    self.xvnc = xvnc  # stopped with the rest if the start fails
                account = provision_user(self.children, login, uid, fast=warm)
                self.state = "starting"
                if xvnc is not None:
                    wait_for_greeting(VNC_PORT, time.monotonic() + X_START_TIMEOUT, lambda: _alive(xvnc))
                self._launch(account, geometry, keyboard, xvnc_up=warm or xvnc is not None, shell_up=shell is not None)
            self.state = "listening"
            threading.Thread(target=self._watch, args=(self.xvnc, self.session), daemon=True).start()
        return {"state": "listening", "user": login, "elapsed_ms": round((time.monotonic() - t0) * 1000)}

    def _launch(
        self,
        account: pwd.struct_passwd,
        geometry: str,
        keyboard: str = "",
        xvnc_up: bool = False,
        shell_up: bool = False,
    ) -> None:
        """Xvnc (unless a warm guest's is up already) and the user's session on it; with ``shell_up`` (a warm
        guest's shell draws the desktop already) only the session's part that is the user's, left to run on."""
        env = user_env(account)
        if self.sound is not None:  # before the session, whose applications look for it
            env.update(self.sound.start(account))
        if keyboard:  # the session script applies it with setxkbmap
            env["DECKARD_KEYBOARD"] = keyboard
        creds = session_creds(account, env)
        if not xvnc_up:
            clear_display(DISPLAY)
            RUN_DIR.mkdir(parents=True, exist_ok=True)
            password_file = install_display_secret(account)
            self.xvnc = xvnc = spawn_xvnc(self.children, DISPLAY, geometry, password_file, creds, "xvnc.log")
            wait_for_greeting(VNC_PORT, time.monotonic() + X_START_TIMEOUT, lambda: _alive(xvnc))
        if shell_up:
            self.launch_env = dict(env)
            env["DECKARD_SHELL_UP"] = "1"  # the session script starts the user's programs and ends
            self._reap_later(self._spawn_session(SESSION_SCRIPT, creds))
            return
        self.session = self._spawn_session(SESSION_SCRIPT, creds)

    def _spawn_session(self, script: str, creds: dict[str, Any], wait: str = "") -> subprocess.Popen[bytes]:
        """``script`` (the session's or the shell's) from the home of ``creds``' user, after the shell line
        ``wait`` if any."""
        session = f"exec /bin/sh {script}" if os.path.exists(script) else FALLBACK_SESSION
        return self._spawn_logged(["/bin/sh", "-c", f'cd "$HOME" || exit 1\n{wait}{session}'], creds)

    def _spawn_logged(self, args: list[str], creds: dict[str, Any]) -> subprocess.Popen[bytes]:
        """``args`` as ``creds`` say, their output appended to session.log."""
        with open(RUN_DIR / "session.log", "ab") as slog:
            return self.children.spawn(args, stdout=slog, stderr=subprocess.STDOUT, **creds)

    def _reap_later(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for a short process from a thread of its own (30 s at most), then forget it."""

        def wait() -> None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            self.children.forget(proc)

        threading.Thread(target=wait, daemon=True).start()

    def launch(self, peer_uid: int, argv: list[str]) -> None:
        """A program the display's shell asks for (``deckard-open`` in its menu) when that shell is not the user's
        (a warm guest's, run as WARM_DISPLAY_USER): started as the user, from their home, with their session's
        environment.  Nobody else may ask: a user's own shell starts its programs itself."""
        with self.lock:
            if peer_uid != pwd.getpwnam(WARM_DISPLAY_USER).pw_uid:
                raise AgentError("forbidden", f"only the shell of a warm guest ({WARM_DISPLAY_USER}) asks here", 403)
            if self.state != "listening" or self.launch_env is None or self.user is None:
                raise AgentError("no_session", "no user has taken this display over", 409)
            account = pwd.getpwnam(self.user)
            env = dict(self.launch_env)
        # the shell backgrounds the program and ends: the program is the init's orphan then, as a session's are
        args = ["/bin/sh", "-c", 'cd "$HOME" 2>/dev/null; "$@" &', "deckard-open", *argv]
        self._reap_later(self._spawn_logged(args, session_creds(account, env)))

    def _set_keyboard(self, keyboard: str) -> None:
        """``setxkbmap`` as the user on the running display (checked by the caller: KEYBOARD_RE)."""
        try:
            account = pwd.getpwnam(self.user or "")
        except KeyError:
            return
        self._reap_later(self._spawn_x_client(account, ["setxkbmap", keyboard], subprocess.DEVNULL))

    def _spawn_x_client(self, account: pwd.struct_passwd, args: list[str], output: int) -> subprocess.Popen[bytes]:
        """A short X client on the session's display, as the user; its output to ``output`` (DEVNULL or PIPE)."""
        return self.children.spawn(
            args,
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            cwd="/",
            env=self.session_env(account),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output == subprocess.PIPE else subprocess.DEVNULL,
        )

    def _watch(self, xvnc: subprocess.Popen[bytes] | None, session: subprocess.Popen[bytes] | None) -> None:
        """Logging out (the session exits) or an Xvnc crash ends the whole display."""
        while _alive(xvnc) and _alive(session):
            time.sleep(0.5)
        with self.lock:
            if self.xvnc is xvnc and self.state == "listening":
                log.info("display ended (xvnc alive=%s, session alive=%s)", _alive(xvnc), _alive(session))
                self._stop_locked()

    # -- stop ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        with self.lock:
            self._stop_locked()

    def _signal_all(self, sig: int) -> None:
        """``sig`` to the session's and the display's process groups and every process of the user."""
        for proc in (self.session, self.xvnc):
            if _alive(proc):
                assert proc is not None
                signal_group(proc, sig)
        if self.uid is not None and self.uid != os.getuid():
            kill_user_processes(self.uid, sig)

    def _stop_locked(self) -> None:
        if self.state == "stopped" and self.xvnc is None:
            return
        self.state = "stopping"
        if self.sound is not None:  # first: its supervisor must not restart what the kill below ends
            self.sound.stop()
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and (_alive(self.xvnc) or _alive(self.session)):
            time.sleep(0.05)
        self._signal_all(signal.SIGKILL)
        for proc in (self.session, self.xvnc):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2.0)
                self.children.forget(proc)
        self.xvnc = self.session = None
        self.user = self.uid = None
        self.launch_env = None
        self.state = "stopped"
        self.claimed = False

    # -- notices -------------------------------------------------------------------------------------
    def notify(self, text: str, timeout: int = 60) -> str:
        """A banner at the top of the user's display (xmessage), if the display is up."""
        banner = ["-geometry", "+0+0", "-bg", "#ffd54f", "-timeout", str(timeout), "-buttons", "OK", text]
        return self._xmessage(banner)

    def _xmessage(self, args: list[str]) -> str:
        """Show ``xmessage ARGS`` on the user's display, as the user; "none" when there is no display."""
        if self.state != "listening" or self.user is None or not shutil.which("xmessage"):
            return "none"
        account = pwd.getpwnam(self.user)
        self.children.spawn(
            ["xmessage", *args],
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            env=self.session_env(account),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return "xmessage"

    # -- expire --------------------------------------------------------------------------------------
    def expire(self) -> str:
        if os.access(EXPIRE_HOOK, os.X_OK):
            self.children.spawn([EXPIRE_HOOK, self.user or ""], stdin=subprocess.DEVNULL)
            return "hook"
        return self._xmessage(["-center", "-timeout", "300", "Your desktop has expired: save your work and log out."])


def serve_launches(session: XSession, path: str = LAUNCH_SOCKET) -> None:
    """Answer ``deckard-open`` (vma/opener.py) on the unix socket ``path``, forever: one JSON list of strings (the
    program and its arguments) and a newline in, ``ok`` or ``error <code>: <message>`` out.  The caller is who the
    kernel says it is (``SO_PEERCRED``); one request at a time, each given LAUNCH_REQUEST_S, so no caller holds the
    others up for longer."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fresh = f"{path}.new"  # bound and listening before it takes the name: a caller is never refused meanwhile
    with contextlib.suppress(FileNotFoundError):
        os.unlink(fresh)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(fresh)
    os.chmod(fresh, 0o666)  # anyone may ask; the agent decides by the caller's uid
    server.listen(16)
    os.replace(fresh, path)
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                session.launch(uid, _launch_request(conn, time.monotonic() + LAUNCH_REQUEST_S))
                conn.sendall(b"ok\n")
            except AgentError as exc:
                with contextlib.suppress(OSError):
                    conn.sendall(f"error {exc.code}: {exc.message}\n".encode())
            except OSError as exc:
                log.info("launch request dropped: %s", exc)


def _launch_request(conn: socket.socket, deadline: float) -> list[str]:
    data = b""
    while not data.endswith(b"\n"):
        try:
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = conn.recv(4096)
        except TimeoutError:
            raise AgentError("timeout", f"a launch request is sent within {LAUNCH_REQUEST_S:g} s") from None
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LAUNCH_REQUEST:
            raise AgentError("too_large", f"a launch request is at most {MAX_LAUNCH_REQUEST} bytes")
    try:
        argv = json.loads(data)
    except ValueError:
        raise AgentError("bad_input", "a launch request is a JSON list of strings") from None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a and "\0" not in a for a in argv):
        raise AgentError("bad_input", "a launch request is a non-empty JSON list of non-empty strings")
    return argv


# -- NX: nxagent for QVD's clients ------------------------------------------------------------------
# nxagent's log lines (nx-libs' "Session:" messages and nxcomp's listening line) and the X state each means
NX_LOG_STATES = (
    ("Session: Starting session at", "starting"),
    ("Info: Waiting for connection from", "listening"),
    ("Session: Session started at", "connected"),
    ("Session: Resuming session at", "starting"),
    ("Session: Session resumed at", "connected"),
    ("Session: Display failure detected at", "suspending"),
    ("Session: Suspending session at", "suspending"),
    ("Session: Session suspended at", "suspended"),
    ("Session: Terminating session at", "stopping"),
    ("Session: Aborting session at", "stopping"),
    ("Session: Session terminated at", "stopped"),
    ("Session: Session aborted at", "stopped"),
)
NX_LINKS = ("modem", "isdn", "adsl", "wan", "lan", "local")
NX_CLIENTS = ("linux", "windows", "macosx")
NX_KEYBOARD_RE = re.compile(r"^[a-z0-9_+-]{1,32}/[a-z]{2,16}$")
TIMEZONE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]{0,30}(/[A-Za-z0-9_+-]{1,30}){0,2}$")
NX_SLAVE_KEY_RE = re.compile(r"^[A-Za-z0-9]{64}$")  # QVD's L7R: 64 letters and digits per connect
# nxagent flags a client may add, and the pattern of the value each takes (None: no value)
NX_EXTRA_ARGS: dict[str, re.Pattern[str] | None] = {
    "-dpi": re.compile(r"^[1-9][0-9]{1,2}$"),
    "-noshmem": None,
    "-noshpix": None,
    "-norender": None,
    "-nocomposite": None,
    "-r": None,
}
NX_LOG_TAIL = 16384  # bytes of nxagent's log read to derive the state: the last state line is near the end


def nx_cookie(token: str) -> str:
    """The nxagent cookie of this start, derived from the agent token as the broker derives it."""
    import hmac  # here, not at the top: with hashlib (OpenSSL) ~5 ms of the start that Xvnc would wait for

    return hmac.new(token.encode(), b"deckard-nx-cookie-v1", "sha256").hexdigest()[:32]


def nx_state_from_log(text: str) -> str | None:
    """The X state the last state line of nxagent's log says (QVD's derivation); None before the first one."""
    state = None
    for line in text.splitlines():
        for prefix, meaning in NX_LOG_STATES:
            if line.startswith(prefix):
                state = meaning
                break
    return state


def parse_nx_params(params: dict[str, str]) -> dict[str, Any]:
    """The NX options of an ``x_start``, each checked (the broker checked them too: the agent trusts nobody)."""

    def bad(what: str) -> AgentError:
        return AgentError("bad_nx_option", what)

    keyboard = params.get("nx_keyboard", "pc105/us")
    if not NX_KEYBOARD_RE.match(keyboard):
        raise bad("nx_keyboard must look like pc105/us")
    link = params.get("nx_link", "adsl")
    if link not in NX_LINKS:
        raise bad(f"nx_link must be one of {', '.join(NX_LINKS)}")
    fullscreen = params.get("nx_fullscreen", "0")
    if fullscreen not in ("0", "1"):
        raise bad("nx_fullscreen must be 0 or 1")
    client = params.get("nx_client", "linux")
    if client not in NX_CLIENTS:
        raise bad(f"nx_client must be one of {', '.join(NX_CLIENTS)}")
    timezone = params.get("timezone", "")
    if timezone and (not TIMEZONE_RE.match(timezone) or ".." in timezone):
        raise bad("timezone must be a zone name such as Europe/Madrid")
    slave_key = params.get("nx_slave_key", "")
    if slave_key and not NX_SLAVE_KEY_RE.match(slave_key):
        raise bad("nx_slave_key must be 64 letters and digits")
    printing = params.get("nx_printing", "0")
    if printing not in ("0", "1"):
        raise bad("nx_printing must be 0 or 1")
    words = params.get("nx_extra", "").split()
    extra: list[str] = []
    i = 0
    while i < len(words):
        flag = words[i]
        if flag not in NX_EXTRA_ARGS:
            raise bad(f"nxagent argument {flag[:30]!r} is not allowed")
        extra.append(flag)
        pattern = NX_EXTRA_ARGS[flag]
        if pattern is not None:
            value = words[i + 1] if i + 1 < len(words) else ""
            if not pattern.match(value):
                raise bad(f"nxagent argument {flag} needs a valid value")
            extra.append(value)
            i += 1
        i += 1
    return {
        "keyboard": keyboard,
        "link": link,
        "fullscreen": fullscreen,
        "client": client,
        "timezone": timezone,
        "extra": extra,
        "slave_key": slave_key,  # shared folders over the slave channel (vma/nx_slave.py); "" turns them off
        "printing": printing == "1",  # the client's printers as queues here (ClientPrinters)
    }


def nx_options_line(opts: dict[str, Any], geometry: str, cookie: str) -> str:
    """nxagent's options file: ``nx/nx,key=value,...:<display>``; every value was checked by parse_nx_options."""
    items = [
        f"link={opts['link']}",
        f"keyboard={opts['keyboard']}",
        f"client={opts['client']}",
        f"geometry={geometry}",
        f"fullscreen={opts['fullscreen']}",
        f"cookie={cookie}",
        # a session resumes on X servers whose depths and pixmap formats differ (the agent's Xvnc for VNC
        # viewers, then the client's Xorg, VcXsrv or Xvfb): nxagent's default, strict, and "safe" refuse the
        # resume unless every depth matches; "risky" asks for one in common (24 bits, which all have)
        "tolerancechecks=risky",
        "media=1",  # sound: nxagent offers the client's PulseAudio on 7100 (vma/sound.py's tunnel sink)
        # the slave channel: the client's shared folders reach NX_SLAVE_CMD (vma/nx_slave.py), and the desktop's
        # programs reach the client's slave server on 127.0.0.1:11100
        "slave=1",
        f"listen={NX_PORT}",
    ]
    return "nx/nx," + ",".join(items) + f":{NX_DISPLAY[1:]}\n"


def xauthority_entry(family: int, address: bytes, number: bytes, cookie: bytes) -> bytes:
    def counted(b: bytes) -> bytes:
        return struct.pack(">H", len(b)) + b

    return struct.pack(">H", family) + b"".join(counted(x) for x in (address, number, b"MIT-MAGIC-COOKIE-1", cookie))


class NxSession(XSession):
    """The user's session under nxagent (QVD's NX display): started, resumed (SIGHUP) and stopped as a unit.

    nxagent runs as the user on display :100 and waits for the proxy on NX_PORT; it refuses any proxy that
    does not send this start's cookie, which only the broker derives.  Its X clients authenticate with the same
    cookie (nxagent's ``-auth``; the fake cookie nx-libs' proxy replaces on the client's side).  The X state is
    read from nxagent's log, as QVD's VMA does: starting, listening, connected, suspending, suspended, stopping.
    When the client goes, nxagent suspends the session and keeps its windows; the next ``x_start`` resumes it.
    """

    display = NX_DISPLAY

    def __init__(self, children: Children, token: str | None, sound: Any = None) -> None:
        super().__init__(children, sound)
        self.cookie = nx_cookie(token) if token else ""
        self.log_path = RUN_DIR / "nxagent.log"
        self.options_path = RUN_DIR / "nx" / "options"
        self.slave_key_path = RUN_DIR / "nx" / "slave-key"
        self.shares: Any = None  # vma/shares.py's ShareServer, when this desktop can mount shared folders
        self.printers: ClientPrinters | None = None  # the client's printers, in an image with CUPS
        self.xauthority = RUN_DIR / "nx" / "xauthority"
        self.timezone = ""
        self.listening_since: float | None = None
        self.connected_once = False
        self.opts: dict[str, Any] = {}  # the NX options of the last start or resume
        self.shadow = False  # nxagent shows the user's Xvnc session (start_nx's shadow_of) rather than its own
        # the session shown to VNC viewers: an Xvnc of its own and a local nxproxy attached to nxagent
        self.view_xvnc: subprocess.Popen[bytes] | None = None
        self.view_proxy: subprocess.Popen[bytes] | None = None

    # -- state ---------------------------------------------------------------------------------------
    def server_alive(self) -> bool:
        return _alive(self.xvnc)

    def current_state(self) -> str:
        if self.state == "listening" and self.viewed():
            return "connected" if vnc_connected(VNC_PORT) else "listening"  # VNC viewers come and go, as on Xvnc
        return self.nx_state()

    def nx_state(self) -> str:
        """The state nxagent's log says (connected also while VNC viewers have it: see :meth:`attach_vnc`)."""
        if self.state != "listening":
            return self.state
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - NX_LOG_TAIL))
                text = f.read().decode(errors="replace")
        except OSError:
            return "starting"
        state = nx_state_from_log(text) or "starting"
        if state == "connected":
            self.connected_once = True
        return state

    def session_env(self, account: pwd.struct_passwd) -> dict[str, str]:
        env = user_env(account, NX_DISPLAY)
        env["XAUTHORITY"] = str(self.xauthority)
        if self.timezone:
            env["TZ"] = self.timezone
        return env

    def input_idle_ms(self) -> int | None:
        if self.state != "listening":
            return None
        try:
            return x_input_idle_ms(NX_DISPLAY, X_QUERY_TIMEOUT, bytes.fromhex(self.cookie))
        except (OSError, struct.error, IndexError) as exc:
            log.info("input idle time unknown: %s", exc)
            return None

    # -- start and resume ------------------------------------------------------------------------------
    def start_nx(
        self,
        login: str,
        uid: int,
        geometry: str,
        keyboard: str,
        opts: dict[str, Any],
        shadow_of: XSession | None = None,
    ) -> dict[str, Any]:
        """Start, resume or take over the user's NX session.  With ``shadow_of`` (the user's Xvnc session, which
        a VNC client opened), nxagent shows that session instead of starting one (its shadow mode: the screen
        read from Xvnc, the QVD client's input sent to it), so a QVD client finds the windows the browser had."""
        t0 = time.monotonic()
        if not self.cookie:
            raise AgentError("nx_unavailable", "the agent has no token to derive the NX cookie from", 500)
        if not shutil.which("nxagent"):
            raise AgentError("nx_unavailable", "this desktop's image has no nxagent: rebuild the image", 409)
        with self.lock:
            if self.viewed():  # VNC viewers have the session: a QVD client takes it over from them
                self._stop_view_locked()
            now = self.nx_state()
            wrong_kind = (shadow_of is not None) != self.shadow
            if self.state == "listening" and (self.user != login or not _alive(self.xvnc) or wrong_kind):
                self._stop_locked()
            elif now in ("connected", "suspending"):
                # the broker's takeover is closing the old tunnel: nxagent suspends the session in a moment
                now = self._wait_state_locked(("suspended", "listening", "stopped"), NX_SUSPEND_WAIT_S)
                if now not in ("suspended", "listening"):
                    raise AgentError("display_busy", "the NX session is still connected to another client", 409)
            if self.state == "listening" and now == "listening":
                return {"state": now, "user": login, "already": True, "protocol": "nx"}
            if self.state == "listening" and now == "suspended":
                self._write_options(opts, geometry)
                self.listening_since = None
                os.kill(self.xvnc.pid, signal.SIGHUP)  # type: ignore[union-attr]
                self._wait_listening_locked(time.monotonic() + NX_INITIATING_TIMEOUT_S)
                self._attach_printers(opts)
                return {"state": "listening", "user": login, "resumed": True, "protocol": "nx", **self._elapsed(t0)}
            if self.state != "stopped":
                self._stop_locked()
            self.state = "provisioning"
            self.user, self.uid = login, uid
            self.connected_once = False
            with undone_on_failure(self._stop_locked, "could not start nxagent"):
                account = provision_user(self.children, login, uid)
                self.state = "starting"
                self._launch_nx(account, geometry, keyboard, opts, shadow_of)
                self.state = "listening"
                self._wait_listening_locked(time.monotonic() + NX_INITIATING_TIMEOUT_S)
            threading.Thread(target=self._watch_nx, args=(self.xvnc, self.session), daemon=True).start()
            self._attach_printers(opts)
        return {"state": "listening", "user": login, "protocol": "nx", **self._elapsed(t0)}

    def _attach_printers(self, opts: dict[str, Any]) -> None:
        if self.printers is not None and opts.get("printing"):
            self.printers.attach(self.nx_state)

    @staticmethod
    def _elapsed(t0: float) -> dict[str, int]:
        return {"elapsed_ms": round((time.monotonic() - t0) * 1000)}

    def _wait_state_locked(self, wanted: tuple[str, ...], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            now = self.nx_state()
            if now in wanted or time.monotonic() >= deadline:
                return now
            time.sleep(0.05)

    def _wait_listening_locked(self, deadline: float) -> None:
        """Return once nxagent waits for the proxy (QVD's initiating timeout); raise if it dies or takes too long."""
        while True:
            if not _alive(self.xvnc):
                raise AgentError("x_start_failed", f"nxagent exited at start; see {self.log_path}", 500)
            if self.nx_state() == "listening":
                self.listening_since = time.monotonic()
                return
            if time.monotonic() >= deadline:
                waited = f"{NX_INITIATING_TIMEOUT_S:g} s"
                raise AgentError("x_timeout", f"nxagent did not listen within {waited}; see {self.log_path}", 504)
            time.sleep(0.02)

    def _write_options(self, opts: dict[str, Any], geometry: str) -> None:
        """The options file nxagent reads at start and again at each resume (root's, readable by the user)."""
        assert self.uid is not None
        tmp = self.options_path.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write(nx_options_line(opts, geometry, self.cookie))
        os.chown(tmp, 0, self.uid)
        os.replace(tmp, self.options_path)
        self._write_slave_key(opts.get("slave_key", ""))
        self.timezone = opts["timezone"]
        self.opts = opts

    def _write_slave_key(self, key: str) -> None:
        """The key the slave command checks (QVD's ``slave.conf``): this connection's, written before nxagent
        starts or resumes; none (every request refused) when the connection brought none."""
        with contextlib.suppress(FileNotFoundError):
            self.slave_key_path.unlink()
        if not key:
            return
        fd = os.open(self.slave_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        os.chown(self.slave_key_path, 0, pwd.getpwuid(self.uid or 0).pw_gid)

    def _launch_nx(
        self,
        account: pwd.struct_passwd,
        geometry: str,
        keyboard: str,
        opts: dict[str, Any],
        shadow_of: XSession | None,
    ) -> None:
        clear_display(NX_DISPLAY)
        number = NX_DISPLAY[1:]
        nx_dir = self.options_path.parent
        nx_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        self._write_options(opts, geometry)
        cookie = bytes.fromhex(self.cookie)
        entries = xauthority_entry(256, socket.gethostname().encode(), number.encode(), cookie)
        entries += xauthority_entry(65535, b"", number.encode(), cookie)  # FamilyWild: any host name
        with contextlib.suppress(FileNotFoundError):
            self.xauthority.unlink()
        fd = os.open(self.xauthority, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(entries)
        os.chown(self.xauthority, account.pw_uid, account.pw_gid)
        env = self.session_env(account)
        if keyboard:
            env["DECKARD_KEYBOARD"] = keyboard
        if os.access(NX_SLAVE_CMD, os.X_OK):
            env["NX_SLAVE_CMD"] = NX_SLAVE_CMD  # nxagent runs it, as the user, for each slave connection
        if self.sound is not None and shadow_of is None:  # a shadow's session has Xvnc's server already
            env.update(self.sound.start(account))
        creds = session_creds(account, env)
        args = ["nxagent", NX_DISPLAY, "-nolisten", "tcp", "-auth", str(self.xauthority), "-name", "Deckard"]
        if shadow_of is not None:  # interactive (shadowmode 1): the QVD client's keyboard and mouse drive it
            args += ["-S", "-shadow", shadow_of.display, "-shadowmode", "1"]
        args += ["-display", f"nx/nx,options={self.options_path}{NX_DISPLAY}", *opts["extra"]]
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as nxlog:
            self.xvnc = self.children.spawn(args, stdout=nxlog, stderr=subprocess.STDOUT, **creds)
        self.shadow = shadow_of is not None
        if shadow_of is not None:  # the session is Xvnc's: it lives and ends there
            self.session = shadow_of.session
            return
        # nxagent takes X clients only once the client's proxy is attached (xinit's wait, in QVD's VMA)
        wait = f"while [ ! -S {X11_SOCKET_DIR}/X{number} ]; do sleep 0.05; done\n"
        self.session = self._spawn_session(SESSION_SCRIPT, creds, wait)

    def _watch_nx(self, nxagent: subprocess.Popen[bytes] | None, session: subprocess.Popen[bytes] | None) -> None:
        """Logging out or nxagent ending ends the display; so does a new session nobody connects to in time."""
        while _alive(nxagent) and _alive(session):
            time.sleep(0.5)
            with self.lock:
                if self.xvnc is not nxagent:
                    return
                state = self.nx_state()  # read every pass: it notes a session that was ever connected
                if state in ("suspending", "suspended") and self.printers is not None and self.printers.queues:
                    self.printers.detach()  # the client went: its printers with it
                if (self.view_xvnc or self.view_proxy) and not self.viewed():
                    log.info("the NX session's VNC view ended: the session suspends")
                    self._stop_view_locked()
                since = self.listening_since
                if (
                    since is not None
                    and not self.connected_once
                    and state == "listening"
                    and time.monotonic() - since > NX_LISTENING_TIMEOUT_S
                    and not self._proxy_connected()
                ):
                    log.info("nobody connected to the new NX session within %g s: stopping it", NX_LISTENING_TIMEOUT_S)
                    self._stop_locked()
                    return
        with self.lock:
            if self.xvnc is nxagent and self.state == "listening":
                log.info("NX display ended (nxagent alive=%s, session alive=%s)", _alive(nxagent), _alive(session))
                self._stop_locked()

    def _proxy_connected(self) -> bool:
        """A client's proxy holds a connection to nxagent's port although its log does not say so yet (a shadow
        session on a loaded machine wrote "Session started" only after the listening timeout: stopped in CI)."""
        if vnc_connected(NX_PORT):
            self.connected_once = True
        return self.connected_once

    def _stop_locked(self) -> None:
        self._stop_view_locked()
        if self.shares is not None:
            self.shares.close_all()
        if self.printers is not None:
            self.printers.detach()
        if self.shadow:  # only nxagent is ours: the session it showed goes on in Xvnc
            nxagent, self.session = self.xvnc, None
            if nxagent is not None:
                _end_process_group(nxagent)
                self.children.forget(nxagent)
            self.xvnc = None
            self.user = self.uid = None
            self.state = "stopped"
            self.shadow = False
        else:
            super()._stop_locked()
        self.listening_since = None
        self.connected_once = False

    # -- VNC viewers: the portal, deckard connect, the spy -----------------------------------------------
    def viewed(self) -> bool:
        """The session is shown to VNC viewers (its view's Xvnc and nxproxy are up)."""
        return _alive(self.view_xvnc) and _alive(self.view_proxy)

    def attach_vnc(self, login: str, geometry: str, keyboard: str) -> dict[str, Any]:
        """Show the session to VNC viewers on VNC_PORT: the session resumes on an Xvnc of its own (VIEW_DISPLAY)
        through a local ``nxproxy -S``, so they see and drive the same windows a QVD client had (QVD's HTML5
        portal does the same with its NX-to-VNC gateway, outside the desktop).  A QVD client that connects
        later takes the session back (:meth:`start_nx` ends the view).  The caller checked ``login``."""
        t0 = time.monotonic()
        with self.lock:
            if self.viewed():
                if keyboard:
                    self._set_keyboard(keyboard)
                return {"state": self.current_state(), "user": login, "already": True, "protocol": "vnc"}
            self._stop_view_locked()  # half of it may be left
            now = self.nx_state()
            if now in ("connected", "suspending"):  # a QVD client has it: the broker's takeover is cutting it off
                now = self._wait_state_locked(("suspended", "stopped"), NX_SUSPEND_WAIT_S)
            if now != "suspended" or not _alive(self.xvnc):
                raise AgentError(
                    "display_busy", f"the NX session cannot be shown to a VNC viewer now (it is {now})", 409
                )
            with undone_on_failure(self._stop_view_locked, "could not show the NX session"):
                self._launch_view(geometry)
        if keyboard:
            self._set_keyboard(keyboard)
        return {"state": "listening", "user": login, "resumed": True, "protocol": "vnc", **self._elapsed(t0)}

    def _launch_view(self, geometry: str) -> None:
        account = pwd.getpwnam(self.user or "")
        deadline = time.monotonic() + NX_INITIATING_TIMEOUT_S
        clear_display(VIEW_DISPLAY)
        env = user_env(account, VIEW_DISPLAY)
        creds = session_creds(account, env)
        password_file = install_display_secret(account)
        self.view_xvnc = xvnc = spawn_xvnc(self.children, VIEW_DISPLAY, geometry, password_file, creds, "view.log")
        # nxagent resumes on the local proxy: no compression (link=lan), the viewer's size, no slave channel
        self._write_options({**self.opts, "link": "lan", "fullscreen": "1", "slave_key": ""}, geometry)
        self.listening_since = None
        os.kill(self.xvnc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        wait_for_greeting(VNC_PORT, deadline, lambda: _alive(xvnc))
        self._wait_listening_locked(deadline)
        # nxproxy reads its cookie from a file the user may read, not from a command line others can see
        proxy_options = self.options_path.with_name("view")
        with contextlib.suppress(FileNotFoundError):
            proxy_options.unlink()
        fd = os.open(proxy_options, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write(f"nx/nx,link=lan,connect=127.0.0.1,port={NX_PORT},cookie={self.cookie}:{VIEW_DISPLAY[1:]}\n")
        os.chown(proxy_options, 0, account.pw_gid)
        spec = f"nx/nx,options={proxy_options}:{VIEW_DISPLAY[1:]}"
        with open(RUN_DIR / "view.log", "ab") as plog:
            self.view_proxy = self.children.spawn(
                ["nxproxy", "-S", spec], stdout=plog, stderr=subprocess.STDOUT, **creds
            )
        now = self._wait_state_locked(("connected", "suspended", "stopped"), NX_INITIATING_TIMEOUT_S)
        if now != "connected":
            raise AgentError("x_timeout", f"the NX session did not resume for the VNC viewer ({now})", 504)
        # nxagent keeps the size it had (it does not follow geometry= on a resume): fit it to the viewer's screen
        width, height = geometry.split("x")
        self._run_as_user(account, ["xrandr", "--fb", f"{width}x{height}"])

    def _run_as_user(self, account: pwd.struct_passwd, args: list[str]) -> None:
        """Run a short X client on the session's display as the user, at most 5 s; a failure only logs."""
        proc = self._spawn_x_client(account, args, subprocess.PIPE)
        try:
            out, _ = proc.communicate(timeout=5)
            if proc.returncode:
                log.info("%s failed (exit %s): %s", args[0], proc.returncode, out.decode(errors="replace")[-300:])
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        finally:
            self.children.forget(proc)

    def _stop_view_locked(self) -> None:
        """End the VNC view: nxagent notices its proxy gone and suspends the session, windows kept."""
        for proc in (self.view_proxy, self.view_xvnc):
            if proc is not None:
                _end_process_group(proc)
                self.children.forget(proc)
        self.view_xvnc = self.view_proxy = None


def _end_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process's group, SIGKILL 3 s later if it is still there; wait for it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3.0)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2.0)


# -- user accounts --------------------------------------------------------------------------------
def provision_user(children: Children, login: str, uid: int, *, fast: bool = False) -> pwd.struct_passwd:
    """Create the account with a fixed uid/gid if missing; give it its (bind-mounted) home on first use.  ``fast``
    (a warm guest taken over: nobody else edits the account files yet) appends the account's lines itself rather
    than run groupadd and useradd."""
    try:
        account = pwd.getpwnam(login)
    except KeyError:
        home = f"/home/{login}"
        if fast and append_account(login, uid):
            return provision_user(children, login, uid)
        rc, out = children.run(["groupadd", "-f", "-g", str(uid), login])
        if rc != 0:
            raise AgentError("provision_failed", f"groupadd {login} failed: {out}", 500) from None
        rc, out = children.run(["useradd", "-M", "-u", str(uid), "-g", str(uid), "-d", home, "-s", "/bin/bash", login])
        if rc != 0:
            raise AgentError("provision_failed", f"useradd {login} failed: {out}", 500) from None
        account = pwd.getpwnam(login)
    if account.pw_uid != uid:
        raise AgentError("user_conflict", f"user {login} exists with uid {account.pw_uid}, not {uid}", 409)
    home_path = Path(account.pw_dir)
    home_path.mkdir(parents=True, exist_ok=True)
    st = home_path.stat()
    if st.st_uid == 0:
        # a new home (the node makes it ours): give the user the image's default dotfiles, then the home.
        # Root here has no DAC override: it may not look into a home the user already owns, and need not.
        skel = Path("/etc/skel")
        if skel.is_dir():
            shutil.copytree(skel, home_path, dirs_exist_ok=True, symlinks=True)
        for root, dirs, files in os.walk(home_path):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), account.pw_uid, account.pw_gid)
    if (st.st_uid, st.st_gid) != (account.pw_uid, account.pw_gid):
        os.chown(home_path, account.pw_uid, account.pw_gid)
        home_path.chmod(0o750)
    return account


ACCOUNT_FILES = ("passwd", "group", "shadow", "gshadow")


def append_account(login: str, uid: int) -> bool:
    """Add the account to /etc as groupadd and useradd would (uid = gid, home /home/<login>, bash, no password);
    False, writing nothing, when the name or the id is taken already (useradd decides then).  The node writes the
    same lines into a cold desktop's layer before it starts (drivers/container.py ``write_account``)."""
    texts = {}
    for name in ACCOUNT_FILES:
        try:
            texts[name] = Path("/etc", name).read_text()
        except OSError:
            return False
    names = {line.split(":", 1)[0] for name in ("passwd", "group") for line in texts[name].splitlines()}
    ids = {f.split(":")[2] for name in ("passwd", "group") for f in texts[name].splitlines() if f.count(":") >= 3}
    if login in names or str(uid) in ids:
        return False
    days = int(time.time() // 86400)
    lines = {
        "passwd": f"{login}:x:{uid}:{uid}::/home/{login}:/bin/bash",
        "group": f"{login}:x:{uid}:",
        "shadow": f"{login}:!:{days}:0:99999:7:::",
        "gshadow": f"{login}:!::",
    }
    for name, line in lines.items():
        target = Path("/etc", name)
        st = target.stat()
        tmp = target.with_name(f".{name}.deckard")
        text = texts[name]
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")
        os.chown(tmp, st.st_uid, st.st_gid)
        tmp.chmod(stat.S_IMODE(st.st_mode))
        os.replace(tmp, target)
    return True


def install_display_secret(account: pwd.struct_passwd) -> Path:
    """Copy the display secret where Xvnc, which runs as the user, can read it; refuse to start without one."""
    try:
        data = Path(DISPLAY_SECRET_FILE).read_bytes()
    except OSError as exc:
        raise AgentError("no_display_secret", f"cannot read {DISPLAY_SECRET_FILE}: {exc.strerror}", 500) from None
    if len(data) != 8:
        raise AgentError("no_display_secret", f"{DISPLAY_SECRET_FILE} is not a VNC password file", 500)
    target = RUN_DIR / "display-passwd"
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chown(target, account.pw_uid, account.pw_gid)
    return target


def user_env(account: pwd.struct_passwd, display: str = DISPLAY) -> dict[str, str]:
    # LANG=C: jwm/twm give up under C.UTF-8 when the image has few fonts
    return {
        "HOME": account.pw_dir,
        "USER": account.pw_name,
        "LOGNAME": account.pw_name,
        "SHELL": account.pw_shell or "/bin/sh",
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "DISPLAY": display,
        "LANG": "C",
    }


def kill_user_processes(uid: int, sig: int) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            os.kill(int(entry), sig)
                        break
        except (OSError, ValueError):
            continue


# -- network probes --------------------------------------------------------------------------------
def clear_display(display: str) -> None:
    """Make the X socket directory and remove a stale lock and socket of ``display``: a previous X server's would
    make the next one refuse to start."""
    tmp_x11 = Path(X11_SOCKET_DIR)
    tmp_x11.mkdir(mode=0o1777, exist_ok=True)
    tmp_x11.chmod(0o1777)
    for stale in (Path(f"/tmp/.X{display[1:]}-lock"), tmp_x11 / f"X{display[1:]}"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def spawn_xvnc(
    children: Children, display: str, geometry: str, password_file: Path, creds: dict[str, Any], log_name: str
) -> subprocess.Popen[bytes]:
    """Xvnc on ``display`` for VNC viewers on VNC_PORT, run as the user (``creds``)."""
    with open(RUN_DIR / log_name, "ab") as xlog:
        args = xvnc_args(display, geometry, str(password_file), glx=glx_wanted())
        return children.spawn(args, stdout=xlog, stderr=subprocess.STDOUT, **creds)


def xvnc_args(display: str, geometry: str, password_file: str, *, glx: bool) -> list[str]:
    """Xvnc's command line: VNC authentication with the display secret, X clients on its unix socket only.  A
    container's boot script starts the same (``drivers/agent_code.py``).  Without ``glx`` Xvnc does not load Mesa's
    software OpenGL (llvmpipe, with LLVM, ICU and z3): it starts ~18 ms sooner and keeps ~10 MB less."""
    opts = ["-depth", "24", "-desktop", "Deckard", "-AlwaysShared", "-nolisten", "tcp"]
    if not glx:
        opts += ["-extension", "GLX"]
    args = ["Xvnc", display, "-rfbport", str(VNC_PORT), "-SecurityTypes", "VncAuth"]
    return [*args, "-PasswordFile", password_file, "-geometry", geometry, *opts]


def wait_for_greeting(port: int, deadline: float, alive: Callable[[], bool]) -> None:
    """Return once the VNC server on ``port`` greets (``RFB 003.00x``): Xvnc listens before its X server has
    finished starting (seconds under a software CPU) and greets only then.  One connection, held until the
    greeting: Xvnc counts every connection closed before authentication towards blacklisting its source."""
    while True:
        if not alive():
            raise AgentError("x_start_failed", f"Xvnc exited at start; see {RUN_DIR}/xvnc.log", 500)
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentError("x_timeout", f"Xvnc did not greet on {port} within {X_START_TIMEOUT:g} s", 504)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.settimeout(left)
                if s.recv(12).startswith(b"RFB "):
                    return
        except OSError:
            pass  # not listening yet, or no greeting in time: the deadline says what to do
        time.sleep(0.01)  # a refused connection costs nothing: a connect waits for the display


def vnc_connected(port: int) -> bool:
    """True when a TCP connection to ``port`` is established.  Asked over netlink (``sock_diag``, as ``ss`` does):
    reading /proc/net/tcp and tcp6 walks the host's whole connection table through a text interface, 8 ms on
    these machines for every ping and ``x_start`` of a desktop with a session; the dump walks it in 2.5 ms."""
    try:
        return _established_on(port)
    except OSError:  # no netlink (a seccomp profile, an odd kernel): the text tables
        return _established_on_from_proc(port)


NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST, NLM_F_DUMP, NLMSG_ERROR, NLMSG_DONE = 0x1, 0x300, 2, 3


def _established_on(port: int) -> bool:
    """An ``inet_diag`` dump of the established TCP connections per address family, looking for local ``port``."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(2)
        return any(
            port in _local_ports(sock, family, seq) for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1)
        )


def _local_ports(sock: socket.socket, family: int, seq: int) -> set[int]:
    """The local ports of one family's established TCP connections, from one dump."""
    # inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid (48 bytes), left empty
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << int(TCP_ESTABLISHED, 16)) + bytes(48)
    sock.send(struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + req)
    ports: set[int] = set()
    while data := sock.recv(65536):
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if kind in (NLMSG_DONE, NLMSG_ERROR) or length < 16:
                return ports
            if offset + 22 <= len(data):  # inet_diag_msg: family, state, timer, retrans, then the source port
                ports.add(struct.unpack_from("!H", data, offset + 20)[0])
            offset += (length + 3) & ~3
    return ports


def _established_on_from_proc(port: int) -> bool:
    want = f"{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[1].rsplit(":", 1)[1] == want and fields[3] == TCP_ESTABLISHED:
                        return True
        except OSError:
            continue
    return False


# -- the display's input idle time -----------------------------------------------------------------
def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the X server closed the connection")
        buf += chunk
    return bytes(buf)


def x_input_idle_ms(display: str = DISPLAY, timeout: float = X_QUERY_TIMEOUT, cookie: bytes = b"") -> int | None:
    """Milliseconds since the last keyboard or mouse input on ``display``; None when the server cannot tell.

    It sends what libXss's ``XScreenSaverQueryInfo`` sends (MIT-SCREEN-SAVER's QueryInfo on the root window), in
    the X11 wire protocol over the display's unix socket: through Xlib, a display that goes away during the call
    would make Xlib exit() this process, the container's init; and the image needs no libXss.  Xvnc runs without
    an authorization file, so a local client needs no cookie; nxagent wants its MIT-MAGIC-COOKIE-1 (``cookie``).
    """
    number = display.lstrip(":").split(".")[0]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(f"{X11_SOCKET_DIR}/X{number}")
        auth_name = b"MIT-MAGIC-COOKIE-1" if cookie else b""
        setup_request = struct.pack("<BxHHHHxx", ord("l"), 11, 0, len(auth_name), len(cookie))  # little-endian, X11.0
        auth = auth_name.ljust(_pad4(len(auth_name)), b"\0") + cookie.ljust(_pad4(len(cookie)), b"\0")
        s.sendall(setup_request + auth)
        status, _, _, _, words = struct.unpack("<BBHHH", _recv_exactly(s, 8))
        setup = _recv_exactly(s, words * 4)
        if status != 1:
            return None  # the server wants authorization
        vendor_len, formats = struct.unpack_from("<H", setup, 16)[0], setup[21]
        (root,) = struct.unpack_from("<I", setup, 32 + _pad4(vendor_len) + 8 * formats)  # the first screen's root
        name = b"MIT-SCREEN-SAVER"
        query_extension = struct.pack("<BxHHxx", 98, 2 + _pad4(len(name)) // 4, len(name))
        s.sendall(query_extension + name.ljust(_pad4(len(name)), b"\0"))
        reply = _recv_exactly(s, 32)
        if reply[0] != 1 or not reply[8]:
            return None  # an error, or no such extension
        s.sendall(struct.pack("<BBHI", reply[9], 1, 2, root))  # ScreenSaverQueryInfo (minor 1) of the root
        reply = _recv_exactly(s, 32)
        if reply[0] != 1:
            return None
        return int(struct.unpack_from("<I", reply, 16)[0])  # ms-since-user-input


def in_words(seconds: int) -> str:
    """``in 5 minutes``-style wording for the notices users read."""
    if seconds < 90:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = (seconds + 59) // 60
    if minutes < 120:
        return f"{minutes} minutes"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} hours" + (f" {minutes} minutes" if minutes else "")


def session_notice_text(reason: str, action: str, in_s: int) -> str:
    when = in_words(in_s)
    if reason == "max_length":
        return f"This session reaches its maximum length: the desktop will be stopped in {when}. Save your work."
    if action == "stop":
        return (
            f"You have not used this desktop for a while: it will be stopped in {when} unless you type or move "
            "the mouse. Save your work."
        )
    return (
        f"You have not used this desktop for a while: you will be disconnected in {when} unless you type or "
        "move the mouse (the desktop keeps running)."
    )


# -- init duties -----------------------------------------------------------------------------------
def _mounted() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def setup_init() -> None:
    """Do what an init would before serving: hostname, pseudo filesystems, loopback.  Best effort."""
    if not os.path.exists("/proc/self/mountinfo"):
        _mount("proc", "/proc", "proc", "nosuid,nodev,noexec")
    mounted = _mounted()
    # LXC normally mounts all of these (lxc.mount.auto, autodev, mount entries); fill in what is missing
    wanted = [
        ("sysfs", "/sys", "sysfs", "ro,nosuid,nodev,noexec"),
        ("devpts", "/dev/pts", "devpts", "newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ("tmpfs", "/dev/shm", "tmpfs", "mode=1777,nosuid,nodev"),
        ("tmpfs", "/tmp", "tmpfs", "mode=1777,nosuid,nodev"),
        ("tmpfs", "/run", "tmpfs", "mode=755,nosuid,nodev"),
    ]
    for source, target, fstype, opts in wanted:
        if target not in mounted:
            Path(target).mkdir(parents=True, exist_ok=True)
            _mount(source, target, fstype, opts)
    try:
        hostname = Path("/etc/hostname").read_text().strip()
        if hostname and hostname != socket.gethostname():
            socket.sethostname(hostname)
    except OSError as exc:
        log.info("hostname not set (%s): keeping %s", exc, socket.gethostname())
    _loopback_up()


def _mount(source: str, target: str, fstype: str, options: str) -> None:
    flags = 0
    data = []
    named = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8}
    for opt in options.split(","):
        if opt in named:
            flags |= named[opt]
        else:
            data.append(opt)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(source.encode(), target.encode(), fstype.encode(), flags, ",".join(data).encode() or None)
    if rc != 0:
        log.warning("mount %s on %s failed: %s", fstype, target, os.strerror(ctypes.get_errno()))


def _loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh14x", b"lo", 0)
        try:
            flags = struct.unpack("16sh14x", fcntl.ioctl(s, siocgifflags, req))[1]
            if not flags & iff_up:
                fcntl.ioctl(s, siocsifflags, struct.pack("16sh14x", b"lo", flags | iff_up))
        except OSError as exc:
            log.warning("loopback not brought up: %s", exc)


# -- PID 1 of a virtual machine ----------------------------------------------------------------------
LINUX_REBOOT_MAGIC = 0xFEE1DEAD, 0x28121969
REBOOT_CAD_OFF = 0x00000000  # Ctrl-Alt-Del sends SIGINT to PID 1 (our graceful power-off) instead of rebooting
REBOOT_POWER_OFF = 0x4321FEDC
EV_KEY, KEY_POWER = 1, 116
INPUT_EVENT = struct.Struct("llHHi")  # struct input_event on 64-bit Linux


def _reboot(cmd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.reboot(ctypes.c_int(cmd)) != 0:
        log.warning("reboot(%#x) failed: %s", cmd, os.strerror(ctypes.get_errno()))


def setup_vm(poweroff: Any) -> None:
    """In a VM: Ctrl-Alt-Del and the ACPI power button (QEMU's ``system_powerdown``) power off cleanly."""
    _reboot(REBOOT_CAD_OFF)
    for device in sorted(Path("/sys/class/input").glob("event*")):
        with contextlib.suppress(OSError):
            if (device / "device/name").read_text().strip() == "Power Button":
                threading.Thread(
                    target=_watch_power_button, args=(f"/dev/input/{device.name}", poweroff), daemon=True
                ).start()


def _watch_power_button(path: str, poweroff: Any) -> None:
    try:
        with open(path, "rb", buffering=0) as f:
            while True:
                data = f.read(INPUT_EVENT.size)
                if len(data) < INPUT_EVENT.size:
                    return
                _sec, _usec, kind, code, value = INPUT_EVENT.unpack(data)
                if kind == EV_KEY and code == KEY_POWER and value == 1:
                    log.info("power button pressed")
                    poweroff()
                    return
    except OSError as exc:
        log.warning("cannot watch the power button %s: %s", path, exc)


def power_off_machine() -> None:
    """Last act of PID 1 in a VM: flush, unmount the home and the root read-only, power off."""
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    with contextlib.suppress(OSError):
        targets = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for target in reversed(targets):
            if target.startswith("/home/"):
                libc.umount2(target.encode(), 0)
    libc.mount(None, b"/", None, 32 | 1, None)  # MS_REMOUNT | MS_RDONLY
    os.sync()
    _reboot(REBOOT_POWER_OFF)


# -- file transfer -----------------------------------------------------------------------------------
FILE_CHUNK = 1 << 20  # what one copy moves: a pipe's worth (FILE_PIPE_SIZE)
FILE_PIPE_SIZE = 1 << 20  # the pipes to a file worker (Linux's default pipe-max-size)
FILE_IDLE_S = 60.0  # a transfer that makes no progress for this long is abandoned
DISCARD_S = 2.0  # after an early refusal of an upload, the rest of its body is read and dropped this long
MAX_PATH_LEN = 4096
DEFAULT_LIST_DIR = "Downloads"

# The file routes' I/O runs in a child process with the desktop user's uid and gid (never root): the kernel
# then refuses whatever the user could not do themselves, whatever a path or a symlink race says.  The child is
# this code string run with ``python3 -I -S -c`` (the agent may itself be bytecode with no source to re-run);
# it speaks JSON lines on stdout: one header line, then, for ``get``, the file's bytes; for ``put``, after
# the header says it is ready, it reads the body on stdin and writes a last line with the outcome.
# Directories are resolved with realpath and must stay in the home; they are then opened from the home one
# component at a time with O_NOFOLLOW, and the final name is opened or created with O_NOFOLLOW too, so a
# symlink swapped in after the check is refused.  Uploads never overwrite: the file is linked into place
# under the first free name ("name (1).ext"...).  New directories are 0755 and files 0644 (the user's own
# tools make them so under the usual umask; the home, 0750, keeps other users out).
FILE_WORKER = r'''
import errno
import json
import os
import signal
import stat
import sys

CHUNK = 1048576
MAX_ENTRIES = 1000
EMPTY_IF_MISSING = ("Downloads", "Uploads")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class FileError(Exception):
    def __init__(self, code, message, status):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def real_home(home):
    real = os.path.realpath(home)
    if real == "/" or not os.path.isdir(real):
        raise FileError("no_home", f"the home directory {home} does not exist yet: start the desktop first", 409)
    return real


def resolve(home, rel):
    """The components of home/rel, every symlink resolved, under the real home; outside_home if it leaves it."""
    target = os.path.realpath(os.path.join(home, rel))
    if target == home:
        return []
    if not target.startswith(home + "/"):
        raise FileError("outside_home", f"{rel} leads outside the home directory: use a path inside it", 403)
    return target[len(home) + 1 :].split("/")


def open_component(fd, name):
    try:
        return os.open(name, DIR_FLAGS, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP) and stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode):
            raise FileError("outside_home", "a symbolic link appeared in the path: try again", 403) from None
        raise


def open_dir(home, parts, create):
    """A directory fd of home/parts, walked from the home without following any symlink (one raced in fails)."""
    fd = os.open(home, DIR_FLAGS)
    try:
        for name in parts:
            try:
                child = open_component(fd, name)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                child = open_component(fd, name)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def entry_of(home, dir_path, entry):
    st = entry.stat(follow_symlinks=False)
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else None
    if stat.S_ISLNK(st.st_mode):
        # a link to a directory of the home can be browsed (dirs resolve); files are fetched by their own name
        real = os.path.realpath(os.path.join(dir_path, entry.name))
        if (real == home or real.startswith(home + "/")) and os.path.isdir(real):
            st, kind = os.stat(real), "dir"
    if kind is None:
        return None
    return {"name": entry.name, "type": kind, "size": st.st_size if kind == "file" else 0, "mtime": st.st_mtime}


def list_dir(home, rel, hidden):
    home = real_home(home)
    parts = resolve(home, rel)
    try:
        fd = open_dir(home, parts, create=False)
    except FileNotFoundError:
        if rel in EMPTY_IF_MISSING:
            return {"entries": [], "truncated": False}
        raise FileError("not_found", f"no directory {rel or '.'} in the home: list an existing one", 404) from None
    dir_path = os.path.join(home, *parts)
    entries = []
    try:
        with os.scandir(fd) as it:
            for entry in it:
                if entry.name.startswith(".") and not hidden:
                    continue
                try:
                    item = entry_of(home, dir_path, entry)
                except OSError:
                    continue  # gone meanwhile, or unreadable
                if item is not None:
                    entries.append(item)
    finally:
        os.close(fd)
    entries.sort(key=lambda e: (e["type"] != "dir", e["name"].casefold(), e["name"]))
    return {"entries": entries[:MAX_ENTRIES], "truncated": len(entries) > MAX_ENTRIES}


def open_file(home, rel):
    """(fd, size) of the regular file home/rel, opened read-only without following a final symlink."""
    home = real_home(home)
    parent, name = os.path.split(rel)
    parts = resolve(home, parent)
    resolve(home, rel)  # a final symlink that leaves the home says outside_home rather than not_a_file
    dfd = open_dir(home, parts, create=False)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileError("not_a_file", f"{rel} is a symbolic link: ask for the file it points to", 400) from None
        raise
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileError("not_a_file", f"{rel} is not a regular file: only files can be downloaded", 400)
    return fd, st.st_size


def free_name(name, n):
    if n == 0:
        return name
    stem, ext = os.path.splitext(name)
    return f"{stem} ({n}){ext}"


def place(dfd, tmp, name):
    """Give the finished temporary file the first free name; never replace an existing one."""
    for n in range(10000):
        candidate = free_name(name, n)
        try:
            os.link(tmp, candidate, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # a file system without hard links: check, then rename (the user could only race themselves)
            try:
                os.lstat(candidate, dir_fd=dfd)
                continue
            except FileNotFoundError:
                os.rename(tmp, candidate, src_dir_fd=dfd, dst_dir_fd=dfd)
                return candidate
        os.unlink(tmp, dir_fd=dfd)
        return candidate
    raise FileError("conflict", f"too many files named like {name}: choose another name", 409)


def put_file(home, rel, size, src, report):
    """Write ``size`` bytes read from fd ``src`` to home/rel (or its first free name); return the name used."""
    home = real_home(home)
    parent, name = os.path.split(rel)
    dfd = open_dir(home, resolve(home, parent), create=True)
    tmp = f".deckard-upload-{os.urandom(8).hex()}.part"
    fd = -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        report({"ok": True, "ready": True})
        got = 0
        while got < size:
            chunk = os.read(src, min(CHUNK, size - got))
            if not chunk:
                raise FileError("short_body", f"the upload ended after {got} of {size} bytes: send it again", 400)
            got += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fchmod(fd, 0o644)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        final = place(dfd, tmp, name)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
    finally:
        os.close(dfd)
    return os.path.join(parent, final)


def error_of(exc):
    if isinstance(exc, FileError):
        return exc.code, exc.message, exc.status
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full", "the desktop's disk or quota is full: free some space and try again", 507
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission_denied", f"the desktop user may not do this ({exc.strerror}): choose another place", 403
    if exc.errno == errno.ENOENT:
        return "not_found", "no such file or directory in the home: check the path", 404
    if exc.errno in (errno.ENOTDIR, errno.ENAMETOOLONG):
        return "bad_path", f"the path is not usable ({exc.strerror}): check it", 400
    if exc.errno == errno.ELOOP:
        return "outside_home", "a symbolic link appeared in the path: use a path inside the home", 403
    return "internal", f"file operation failed: {exc.strerror or exc}", 500


def main(argv):
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so a partial upload is removed
    os.umask(0o022)

    def report(data):
        os.write(1, (json.dumps(data) + "\n").encode())

    op, home, rel = argv[1:4]
    try:
        if op == "list":
            report({"ok": True, **list_dir(home, rel, argv[4] == "1")})
        elif op == "get":
            fd, size = open_file(home, rel)
            report({"ok": True, "size": size})
            left = size
            while left:
                chunk = os.read(fd, min(CHUNK, left))
                if not chunk:
                    break  # it shrank: the agent sees the short stream
                left -= len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(1, view) :]
        elif op == "put":
            report({"ok": True, "path": put_file(home, rel, int(argv[4]), 0, report)})
    except (FileError, OSError) as exc:
        code, message, status = error_of(exc)
        report({"ok": False, "status": status, "error": {"code": code, "message": message}})
    except Exception as exc:
        report({"ok": False, "status": 500, "error": {"code": "internal", "message": f"file operation failed: {exc}"}})


if __name__ == "__main__":
    main(sys.argv)
'''


def check_rel_path(rel: str, *, file: bool) -> str:
    """``rel`` normalised ("a/./b/" -> "a/b", "." -> ""), or bad_path: absolute, NUL, ``..``, too long, no name."""
    if len(rel) > MAX_PATH_LEN:
        raise AgentError("bad_path", f"the path is longer than {MAX_PATH_LEN} characters: shorten it")
    if "\0" in rel:
        raise AgentError("bad_path", "the path contains a NUL character: remove it")
    if rel.startswith("/"):
        raise AgentError("bad_path", "the path is absolute: give it relative to the home directory")
    parts = rel.split("/")
    if ".." in parts:
        raise AgentError("bad_path", "the path contains '..': give it relative to the home, without '..'")
    if file and parts[-1] in ("", "."):
        raise AgentError("bad_path", "the path names no file: end it with the file's name")
    return "/".join(p for p in parts if p not in ("", "."))


def file_account(login: str) -> pwd.struct_passwd:
    """The desktop user a file route acts for: an existing account with a desktop uid."""
    if not LOGIN_RE.match(login):
        raise AgentError("bad_input", "login must be a login name (lowercase letters, digits, _.-)")
    try:
        account = pwd.getpwnam(login)
    except KeyError:
        raise AgentError(
            "no_user", f"{login} has no account in this desktop yet: start the desktop first", 409
        ) from None
    if not MIN_UID <= account.pw_uid <= MAX_UID:
        raise AgentError("bad_input", f"{login} is not a desktop user (uid {MIN_UID}-{MAX_UID})")
    return account


def _worker_error(reply: dict[str, Any]) -> AgentError:
    """The worker's error line as an AgentError (it runs as the user: take nothing on trust)."""
    error = reply.get("error")
    status = reply.get("status")
    if isinstance(error, dict) and isinstance(status, int) and 400 <= status <= 599:
        code, message = error.get("code"), error.get("message")
        if isinstance(code, str) and re.fullmatch(r"[a-z_]{1,32}", code) and isinstance(message, str):
            return AgentError(code, message[:1000], status)
    return AgentError("internal", "the file worker answered nonsense", 500)


class FileWorker:
    """One run of :data:`FILE_WORKER` as the desktop user, with the agent's side of its pipes.

    The pipes are non-blocking and every wait is bounded by :data:`FILE_IDLE_S`: the worker runs as the user,
    who may stop or kill it, and an agent thread must not hang on it.
    """

    def __init__(self, children: Children, account: pwd.struct_passwd, args: list[str]) -> None:
        creds: dict[str, Any] = {}
        if (account.pw_uid, account.pw_gid) != (os.geteuid(), os.getegid()):
            if os.geteuid() != 0:
                raise AgentError("internal", f"the agent runs as uid {os.geteuid()} and cannot act as another", 500)
            creds = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        self.children = children
        try:
            self.proc = children.spawn(
                [sys.executable, "-I", "-S", "-c", FILE_WORKER, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                bufsize=0,
                cwd="/",  # Popen changes directory before it drops to the user
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
                **creds,
            )
        except OSError as exc:
            message = f"cannot run {sys.executable} as {account.pw_name}: {exc.strerror}"
            raise AgentError("internal", message, 500) from None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in: int | None = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        for fd in (self._in, self._out):
            os.set_blocking(fd, False)
            # a pipe holds 64 KiB: agent and worker would take turns every 64 KiB of a transfer
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, FILE_PIPE_SIZE)
        self._buffer = b""

    def _wait(self, fd: int, read: bool) -> None:
        ready = select.select([fd], [], [], FILE_IDLE_S) if read else select.select([], [fd], [], FILE_IDLE_S)
        if not any(ready):
            raise AgentError("timeout", f"the file transfer made no progress for {FILE_IDLE_S:g} s: try again", 504)

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the worker's output; b"" when it ended."""
        if self._buffer:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
            return data
        while True:
            self._wait(self._out, read=True)
            try:
                return os.read(self._out, size)
            except BlockingIOError:
                continue

    def read_reply(self) -> dict[str, Any]:
        """The worker's next JSON line; an error with its code when it says ``ok: false``."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > 1 << 20:
                raise AgentError("internal", "the file worker answered nonsense", 500)
            chunk = self.read(FILE_CHUNK)
            if not chunk:
                raise AgentError("internal", "the file worker ended without an answer", 500)
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise AgentError("internal", "the file worker answered nonsense", 500)
        if reply.get("ok") is not True:
            raise _worker_error(reply)
        return reply

    def write(self, data: bytes) -> bool:
        """Send ``data`` to the worker; False when it stopped reading (it will say why)."""
        view = memoryview(data)
        fd = self._in
        while view and fd is not None:
            self._wait(fd, read=False)
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                return False
        return True

    def close_input(self) -> None:
        if self.proc.stdin is not None and self._in is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            self._in = None

    def finish(self) -> None:
        """Reap the worker; one that does not end is sent SIGTERM (an upload then removes its temporary file)."""
        self.close_input()
        if self.proc.stdout is not None:
            self.proc.stdout.close()  # a download cut short ends on EPIPE
        for stop in (None, self.proc.terminate, self.proc.kill):
            if stop is not None:
                stop()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
                break
        self.children.forget(self.proc)


def _entries_of(reply: dict[str, Any]) -> list[dict[str, Any]]:
    entries = []
    for item in reply.get("entries") or []:
        if (
            isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and item.get("type") in ("file", "dir")
            and isinstance(item.get("size"), int)
            and isinstance(item.get("mtime"), int | float)
        ):
            entries.append({k: item[k] for k in ("name", "type", "size", "mtime")})
    return entries


def list_files(children: Children, account: pwd.struct_passwd, rel_dir: str, hidden: bool) -> dict[str, Any]:
    worker = FileWorker(children, account, ["list", account.pw_dir, rel_dir, "1" if hidden else "0"])
    try:
        reply = worker.read_reply()
    finally:
        worker.finish()
    truncated = reply.get("truncated") is True
    return {"ok": True, "dir": rel_dir, "entries": _entries_of(reply)[:1000], "truncated": truncated}


# -- the desktop's PDF printer ------------------------------------------------------------------------
CUPSD = "/usr/sbin/cupsd"
CUPS_SOCKET = "/run/cups/cups.sock"
CUPSD_LOG = RUN_DIR / "cupsd.log"
PDF_QUEUE = "PDF"
PDF_QUEUE_DESCRIPTION = "Print to your browser (PDF)"
PDF_DEVICE = "cups-pdf:/"
CUPS_START_TIMEOUT = 60.0 if SOFTWARE_CPU else 15.0
CUPS_MAX_RESTARTS = 5  # in a row: a cupsd that keeps dying is left dead (and logged), the desktop carries on
CUPS_STABLE_S = 60.0  # a cupsd that ran this long before dying starts the count again


def pick_pdf_model(lpinfo: str) -> str | None:
    """cups-pdf's model among ``lpinfo -m`` lines (``<model> <make and model>``): the one with options if listed."""
    models = [line.split(" ", 1)[0] for line in lpinfo.splitlines() if "CUPS-PDF" in line.upper()]
    ranked = sorted(models, key=lambda m: "_opt" not in m)
    return ranked[0] if ranked else None


class PdfPrinter:
    """cupsd and its one queue, ``PDF`` (cups-pdf), in an image that has CUPS (``standard``); none otherwise.

    Users print as on any desktop (an application's Print dialog, ``lp``) and the job becomes a PDF in ``~/PDF``.
    Everything runs in one background thread, away from the RPC server and the display: cupsd is started, the
    queue made once its socket answers (idempotent: a kept overlay already has it), and a cupsd that dies is
    logged and started again, at most :data:`CUPS_MAX_RESTARTS` times in a row.  The image's ``cupsd.conf`` makes
    it listen on its unix socket only, so a desktop offers no printing service to its network.
    """

    def __init__(self, children: Children, cupsd: str = CUPSD, socket_path: str = CUPS_SOCKET) -> None:
        self.children = children
        self.cupsd = cupsd
        self.socket_path = socket_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()

    def start(self) -> bool:
        """Start supervising cupsd in the background; False (and nothing done) when the image has no CUPS."""
        if not os.access(self.cupsd, os.X_OK):
            return False
        threading.Thread(target=self._supervise, daemon=True, name="cupsd").start()
        return True

    def stop(self) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is not None and _alive(proc):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()

    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            t0 = time.monotonic()
            try:
                RUN_DIR.mkdir(parents=True, exist_ok=True)
                with open(CUPSD_LOG, "ab") as out:  # the image's cups-files.conf sends cupsd's logs to stderr
                    self.proc = proc = self.children.spawn(
                        [self.cupsd, "-f"],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
                    )
            except OSError as exc:
                log.warning("printer: cannot start %s: %s", self.cupsd, exc)
                return
            if self._wait_for_socket(proc, t0 + CUPS_START_TIMEOUT):
                self.ensure_queue(t0)
            rc = proc.wait()
            self.children.forget(proc)
            if self._stopping.is_set():
                return
            failures = 1 if time.monotonic() - t0 > CUPS_STABLE_S else failures + 1
            if failures > CUPS_MAX_RESTARTS:
                log.warning("printer: cupsd exited %d times in a row: printing is off (see %s)", failures, CUPSD_LOG)
                return
            log.warning("printer: cupsd exited with %s (see %s); starting it again", rc, CUPSD_LOG)
            self._stopping.wait(min(2.0**failures, 30.0))

    def _wait_for_socket(self, proc: subprocess.Popen[bytes], deadline: float) -> bool:
        while _alive(proc) and time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(self.socket_path)
                    return True
                except OSError:
                    pass
            time.sleep(0.05)
        if _alive(proc):
            log.warning("printer: cupsd did not open %s within %g s", self.socket_path, CUPS_START_TIMEOUT)
        return False

    def _lp(self, args: list[str], timeout: float = 30.0) -> tuple[int, str]:
        try:
            return self.children.run(args, timeout=timeout)
        except OSError as exc:
            return 127, str(exc)

    def ensure_queue(self, t0: float) -> bool:
        """Make the ``PDF`` queue unless cupsd has it, and make it the default destination; log the outcome."""
        made = ""
        rc, _ = self._lp(["lpstat", "-v", PDF_QUEUE])
        if rc != 0:
            rc, out = self._lp(["lpinfo", "-m"])
            model = pick_pdf_model(out)
            if model is None:
                log.warning("printer: no cups-pdf model in `lpinfo -m` (exit %d): %s", rc, out[-300:])
                return False
            # deny:root: the job's user decides whose account cups-pdf writes as, and no job may run as root
            args = ["lpadmin", "-p", PDF_QUEUE, "-E", "-v", PDF_DEVICE, "-m", model, "-D", PDF_QUEUE_DESCRIPTION]
            rc, out = self._lp([*args, "-o", "printer-is-shared=false", "-u", "deny:root"])
            if rc != 0:
                log.warning("printer: lpadmin -p %s failed (exit %d): %s", PDF_QUEUE, rc, out[-300:])
                return False
            made = f" made with {model},"
        rc, out = self._lp(["lpadmin", "-d", PDF_QUEUE])
        if rc != 0:
            log.warning("printer: lpadmin -d %s failed (exit %d): %s", PDF_QUEUE, rc, out[-300:])
            return False
        elapsed_ms = (time.monotonic() - t0) * 1000
        log.info("printer: queue %s%s ready %.0f ms after cupsd's start", PDF_QUEUE, made, elapsed_ms)
        return True


class ClientPrinters:
    """A QVD client's printers as CUPS queues ``QVD-<id>`` while its NX session is attached (QVD's "slave4"
    printing; vma/nx_print.py is the queues' backend and says how jobs reach the client).

    :meth:`attach` works in the background: it waits for the client to be connected, asks it for its printers
    over the slave channel and adds a queue for each (the first becomes the default destination, as QVD's
    ``qvd-printing`` makes it); :meth:`detach` removes them when the client goes.  Each attach replaces the
    queues of the one before."""

    def __init__(self, children: Children, ppd_dir: Path = RUN_DIR / "print") -> None:
        self.children = children
        self.ppd_dir = ppd_dir
        self.queues: list[str] = []
        self.lock = threading.Lock()
        self.generation = 0

    def attach(self, state: Callable[[], str]) -> None:
        with self.lock:
            self.generation += 1
            generation = self.generation
        threading.Thread(target=self._attach, args=(state, generation), daemon=True, name="nx-printers").start()

    def _attach(self, state: Callable[[], str], generation: int) -> None:
        deadline = time.monotonic() + NX_INITIATING_TIMEOUT_S
        while state() != "connected":
            if time.monotonic() > deadline or self.generation != generation:
                return
            time.sleep(0.1)
        try:
            printers = NX_PRINT.client_printers()
        except NX_PRINT.PrintError as exc:
            log.info("printing: the client's printers are not known: %s", exc)
            return
        with self.lock:
            if self.generation != generation:
                return
            self._remove_locked()
            self.ppd_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            for printer in printers:
                queue = f"QVD-{printer['qvd_id']}"
                ppd_file = self.ppd_dir / f"{queue}.ppd"
                ppd_file.write_text(NX_PRINT.ppd(printer["name"], duplex=printer["duplex"], color=printer["color"]))
                args = ["lpadmin", "-p", queue, "-E", "-v", f"{NX_PRINT.SCHEME}:/{printer['qvd_id']}", "-P"]
                args += [str(ppd_file), "-D", printer["name"], "-L", "QVD client", "-o", "printer-is-shared=false"]
                rc, out = self.children.run(args)
                if rc != 0:
                    log.warning("printing: lpadmin -p %s failed (exit %d): %s", queue, rc, out[-300:])
                    continue
                if not self.queues:
                    self.children.run(["lpadmin", "-d", queue])
                self.queues.append(queue)
        log.info("printing: the client's printers are queues %s", ", ".join(self.queues) or "(none)")

    def detach(self) -> None:
        with self.lock:
            self.generation += 1
            self._remove_locked()

    def _remove_locked(self) -> None:
        if not self.queues:
            return
        for queue in self.queues:
            self.children.run(["lpadmin", "-x", queue])
        self.children.run(["lpadmin", "-d", PDF_QUEUE])
        log.info("printing: the client's printers were removed (%s)", ", ".join(self.queues))
        self.queues = []


# -- HTTP RPC --------------------------------------------------------------------------------------
class Agent:
    """The RPC methods; one instance per process."""

    def __init__(self, token: str | None, is_init: bool) -> None:
        self.token = token
        self.is_init = is_init
        self.children = Children()
        self.sound = SOUND.SoundServer(self.children, log_path=RUN_DIR / "pulseaudio.log") if SOUND else None
        self.x = XSession(self.children, self.sound)
        self.nx = NxSession(self.children, token, self.sound)  # one server: the two sessions never run together
        self.printer = PdfPrinter(self.children)
        self.server: ThreadingHTTPServer | None = None
        self._powering_off = threading.Event()
        # set once the display started at boot (``--display-for``, ``--warm``) is up or has failed: a connect's
        # x_start waits for it instead of starting a second display beside it
        self.boot_display_done = threading.Event()
        self.boot_display_done.set()

    def share_user(self) -> tuple[str, int, int, str] | None:
        """Who may mount shared folders now: the user of a running NX session (login, uid, gid, home)."""
        nx = self.nx
        if nx.state != "listening" or nx.user is None:
            return None
        account = pwd.getpwnam(nx.user)
        return (nx.user, account.pw_uid, account.pw_gid, account.pw_dir)

    def call(self, method: str, params: dict[str, str]) -> dict[str, Any]:
        handler = getattr(self, f"rpc_{method}", None)
        if handler is None or not re.fullmatch(r"[a-z_]+", method):
            raise AgentError("unknown_method", f"no such method: {method}", 404)
        result: dict[str, Any] = handler(params)
        return result

    def rpc_exec(self, params: dict[str, str]) -> dict[str, Any]:
        """Run ``command`` with ``sh -c`` as root (or as ``user``), at most ``timeout`` s; output capped.

        The node's way into a guest it cannot enter from the host (a VM): diagnostics (``lsblk``, ``mount``) and
        the end-to-end tests.  Only holders of the agent token, the node and the broker, can call it.
        """
        command = params.get("command", "")
        if not command or len(command) > 4096:
            raise AgentError("bad_input", "command must be 1-4096 characters")
        try:
            timeout = float(params.get("timeout", "10"))
        except ValueError:
            raise AgentError("bad_input", "timeout must be a number") from None
        if not 0 < timeout <= MAX_EXEC_S:
            raise AgentError("bad_input", f"timeout must be between 0 and {MAX_EXEC_S:.0f} s")
        args = ["/bin/sh", "-c", command]
        user = params.get("user", "")
        if user:
            if not LOGIN_RE.match(user):
                raise AgentError("bad_input", "user must be a login")
            args = ["su", "-", user, "-c", command]
        proc = self.children.spawn(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the command's children too: they hold its output open
            out, err = proc.communicate()
            raise AgentError("exec_timeout", f"the command ran longer than {timeout:g} s", 504) from None
        finally:
            self.children.forget(proc)
        return {
            "returncode": proc.returncode,
            "stdout": out[-MAX_EXEC_OUTPUT:].decode(errors="replace"),
            "stderr": err[-MAX_EXEC_OUTPUT:].decode(errors="replace"),
        }

    def active(self) -> XSession:
        """The display that is up (NX or VNC; never both): the one states, notices and idle times come from."""
        if self.nx.state == "listening" and (not self.nx.server_alive() or self.nx.nx_state() == "stopped"):
            # nxagent has just died, or ended its session (a logout: its log says so before its process is gone):
            # its watcher would notice within half a second, and a VNC connect meanwhile would be refused
            self.nx.stop()
        return self.nx if self.nx.state != "stopped" and not self.nx.shadow else self.x

    def rpc_ping(self, _params: dict[str, str]) -> dict[str, Any]:
        display = self.active()
        return {"version": VERSION, "x_state": display.current_state(), "protocol": _protocol(display)}

    def rpc_x_state(self, _params: dict[str, str]) -> dict[str, Any]:
        """The display's state and the protocol of its session (``nx`` for nxagent's own, ``vnc`` for Xvnc's
        whichever client shows it); ``shadowed`` while a QVD client is shown the Xvnc session."""
        display = self.active()
        return {
            "state": display.current_state(),
            "user": display.user,
            "protocol": _protocol(display),
            "shadowed": self.nx.shadow,
        }

    def rpc_x_start(self, params: dict[str, str]) -> dict[str, Any]:
        login, uid = checked_user(params)
        self.boot_display_done.wait(BOOT_DISPLAY_WAIT_S)
        geometry = params.get("geometry", DEFAULT_GEOMETRY)
        if not GEOMETRY_RE.match(geometry):
            raise AgentError("bad_input", "geometry must look like 1280x800")
        keyboard = params.get("keyboard", "")
        if keyboard and not KEYBOARD_RE.match(keyboard):
            raise AgentError("bad_input", "keyboard must be an XKB layout such as us, de or fr(azerty)")
        protocol = params.get("protocol", "vnc")
        if protocol == "nx":
            opts = parse_nx_params(params)
            if self.x.state != "stopped":
                if self.x.claimed and self.x.user == login and self.x.state == "listening":
                    return self.nx.start_nx(login, uid, geometry, keyboard, opts, shadow_of=self.x)
                self.x.stop()  # started early (--display-for) and never shown, or another user's
            return self.nx.start_nx(login, uid, geometry, keyboard, opts)
        if protocol != "vnc":
            raise AgentError("bad_input", "protocol must be vnc or nx")
        if self.active() is self.nx:
            if self.nx.user == login:
                return self.nx.attach_vnc(login, geometry, keyboard)
            self.nx.stop()  # another user's session (the desktop changed hands): theirs ends
        self.x.claimed = True
        result = self.x.start(login, uid, geometry, keyboard)
        return {**result, "protocol": "vnc"}

    def rpc_take_over(self, params: dict[str, str]) -> dict[str, Any]:
        """A user takes this warm guest over (its node has mounted their home and given it the desktop's address):
        the address in /etc/hosts, their account, and their session on the display that is already up."""
        login, uid = checked_user(params)
        self.boot_display_done.wait(BOOT_DISPLAY_WAIT_S)
        ip = params.get("ip", "")
        if not IPV4_RE.match(ip) or any(int(part) > 255 for part in ip.split(".")):
            raise AgentError("bad_input", "ip must be an IPv4 address")
        if self.x.state != "warm":
            raise AgentError("not_warm", f"this guest is not a warm one (its display is {self.x.state})", 409)
        hostname = socket.gethostname()
        Path("/etc/hosts").write_text(f"127.0.0.1\tlocalhost\n{ip}\t{hostname}\n")
        result = self.x.start(login, uid, DEFAULT_GEOMETRY)
        log.info("taken over by %s at %s", login, ip)
        return result

    def rpc_x_stop(self, _params: dict[str, str]) -> dict[str, Any]:
        self.nx.stop()
        self.x.stop()
        return {"state": self.x.current_state()}

    def rpc_expire(self, _params: dict[str, str]) -> dict[str, Any]:
        return {"notified": self.active().expire()}

    def rpc_spy_notice(self, params: dict[str, str]) -> dict[str, Any]:
        """An administrator started watching: the user must be able to see it (a banner on their display)."""
        admin = re.sub(r"[^A-Za-z0-9_.@-]", "", params.get("admin", ""))[:64] or "an administrator"
        mode = "and may control it" if params.get("interactive") == "1" else "(view only)"
        return {"notified": self.active().notify(f"Your desktop is being watched by {admin} {mode}.", timeout=60)}

    def rpc_idle(self, _params: dict[str, str]) -> dict[str, Any]:
        """The display's state and how long its user has not typed nor moved the mouse (null: cannot tell)."""
        display = self.active()
        return {"state": display.current_state(), "user": display.user, "idle_ms": display.input_idle_ms()}

    def rpc_session_notice(self, params: dict[str, str]) -> dict[str, Any]:
        """A session policy will act in ``in_s`` seconds (``reason`` idle|max_length, ``action`` stop|disconnect):
        tell the user on their display, for as long as the notice holds."""
        reason, action = params.get("reason", ""), params.get("action", "")
        if reason not in ("idle", "max_length") or action not in ("stop", "disconnect"):
            raise AgentError("bad_input", "reason must be idle or max_length, action stop or disconnect")
        try:
            in_s = int(params.get("in_s", ""))
        except ValueError:
            raise AgentError("bad_input", "in_s must be an integer") from None
        if not 0 <= in_s <= MAX_NOTICE_S:
            raise AgentError("bad_input", f"in_s must be between 0 and {MAX_NOTICE_S}")
        text = session_notice_text(reason, action, in_s)
        return {"notified": self.active().notify(text, timeout=max(in_s, 10))}

    def early_display(self, login_uid: str, xvnc: subprocess.Popen[bytes] | None = None) -> None:
        """Start the display for ``LOGIN:UID`` before anyone asks (``--display-for``), on ``xvnc`` when the boot
        script started it (``--xvnc-pid``); a failure only logs (a connect starts the display again)."""
        login, _, uid_text = login_uid.partition(":")
        try:
            uid = int(uid_text)
            if not LOGIN_RE.match(login) or not MIN_UID <= uid <= MAX_UID:
                raise ValueError(login_uid)
            self.x.start(login, uid, DEFAULT_GEOMETRY, xvnc=xvnc)
            log.info("display started early for %s", login)
        except (AgentError, ValueError) as exc:
            log.warning("no early display for %s: %s", login_uid, exc)
            if xvnc is not None and self.x.xvnc is not xvnc and _alive(xvnc):
                signal_group(xvnc, signal.SIGKILL)  # nobody's display: a connect starts its own

    def rpc_poweroff(self, _params: dict[str, str]) -> dict[str, Any]:
        # answer first: the caller must learn that the poweroff was accepted before the agent goes away
        threading.Timer(0.1, self.poweroff).start()
        return {"state": "stopping"}

    def poweroff(self) -> None:
        if self._powering_off.is_set():
            return
        self._powering_off.set()
        log.info("powering off")
        self.printer.stop()
        self.nx.stop()
        self.x.stop()  # the sound server with it
        if self.is_init and os.getpid() == 1:
            # as PID 1 of the container: every process left is ours to end
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGTERM)
            alone_within(POWEROFF_GRACE_S)
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)
            os.sync()
        if self.server is not None:
            shut_down(self.server)

    def rpc_block_devices(self, _params: dict[str, str]) -> dict[str, Any]:
        """The guest's disks, as ``lsblk`` lists them: ``{name, serial, size, read_only, mountpoints}`` each, the
        mount points those of the disk and of its partitions (``[SWAP]`` for swap).  Read-only; the node asks it
        before it unplugs a volume (``vol-<id>`` serial) so that a mounted one is never pulled away."""
        return {"devices": block_devices()}


POWEROFF_GRACE_S = 0.5  # what the processes left at a poweroff have to end on SIGTERM before they are killed


def alone_within(seconds: float, proc: Path = Path("/proc")) -> bool:
    """Wait until this PID 1 is the only process of its namespace (the reaper collects the others as they end;
    a VM's kernel threads, children of its ``kthreadd``, do not count), ``seconds`` at most; whether it is.  Most
    end within milliseconds of a SIGTERM: a stop need not wait longer."""
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(OSError), os.scandir(proc) as entries:
            if not any(_a_process(entry) for entry in entries):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _a_process(entry: os.DirEntry[str]) -> bool:
    """Whether a ``/proc`` entry is a process other than PID 1 and the kernel's threads (``kthreadd``, PID 2, and
    its children)."""
    if not entry.name.isdigit() or entry.name in ("1", "2"):
        return False
    try:
        ppid = Path(entry.path, "stat").read_text().rpartition(")")[2].split()[1]
    except (OSError, IndexError):
        return False  # gone meanwhile
    return ppid != "2"


def shut_down(server: Any) -> None:
    """Stop ``server.serve_forever`` now rather than at its next poll (half a second when idle): connections of its
    own wake it until ``shutdown`` returns."""
    stopping = threading.Thread(target=server.shutdown, daemon=True)
    stopping.start()
    host, port = server.server_address[:2]
    while stopping.is_alive():
        with contextlib.suppress(OSError), socket.create_connection((host or "127.0.0.1", port), timeout=0.2):
            pass
        stopping.join(0.05)


def checked_user(params: dict[str, str]) -> tuple[str, int]:
    """The ``user`` and ``uid`` parameters, checked (``bad_input`` otherwise)."""
    login = params.get("user", "")
    if not LOGIN_RE.match(login):
        raise AgentError("bad_input", "user must be a login name (lowercase letters, digits, _.-)")
    try:
        uid = int(params.get("uid", ""))
    except ValueError:
        raise AgentError("bad_input", "uid must be an integer") from None
    if not MIN_UID <= uid <= MAX_UID:
        raise AgentError("bad_input", f"uid must be between {MIN_UID} and {MAX_UID}")
    return login, uid


def _protocol(display: XSession) -> str:
    return "nx" if isinstance(display, NxSession) else "vnc"


def _read_sys(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _unescape_mount(text: str) -> str:
    """/proc/mounts writes a space as \\040 (and tab, newline, backslash alike)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def block_devices(sys_block: str = "/sys/block", proc: str = "/proc") -> list[dict[str, Any]]:
    used: dict[str, list[str]] = {}
    for line in _read_sys(f"{proc}/mounts").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].startswith("/dev/"):
            used.setdefault(fields[0][5:], []).append(_unescape_mount(fields[1]))
    for line in _read_sys(f"{proc}/swaps").splitlines()[1:]:
        if line.startswith("/dev/"):
            used.setdefault(line.split()[0][5:], []).append("[SWAP]")
    devices = []
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        names = []
    for name in names:
        base = f"{sys_block}/{name}"
        size = int(_read_sys(f"{base}/size") or 0) * 512
        if name.startswith(("loop", "ram")) and not size:
            continue
        try:
            parts = sorted(p for p in os.listdir(base) if p.startswith(name))
        except OSError:
            parts = []
        devices.append(
            {
                "name": name,
                "serial": _read_sys(f"{base}/serial") or _read_sys(f"{base}/device/serial"),
                "size": size,
                "read_only": _read_sys(f"{base}/ro") == "1",
                "mountpoints": [m for dev in (name, *parts) for m in used.get(dev, [])],
            }
        )
    return devices


def handler_class() -> type[BaseHTTPRequestHandler]:
    """The agent's HTTP handler class, made at first use: ``http.server`` and what it imports (email, http.client,
    html, mimetypes: ~20 ms of the agent's start) load after ``main`` has set the early display going, so Xvnc
    boots beside them instead of after them (measured in a container: Xvnc spawned at 46 ms instead of ~66)."""
    global _HANDLER
    if _HANDLER is None:
        _HANDLER = _make_handler()
    return _HANDLER


_HANDLER: type[BaseHTTPRequestHandler] | None = None


def _make_handler() -> type[BaseHTTPRequestHandler]:
    from hmac import compare_digest
    from http.server import BaseHTTPRequestHandler
    from urllib.parse import parse_qs, quote, urlsplit

    class Handler(BaseHTTPRequestHandler):
        server_version = f"deckard-vma/{VERSION}"
        agent: Agent  # set on the subclass made by serve()

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path in ("/files/list", "/files/get"):
                self._handle_files()
            elif path == "/sound":
                self._handle_sound()
            else:
                self._handle()

        def do_POST(self) -> None:
            self._handle()

        def do_PUT(self) -> None:
            self._handle_files()

        def _handle(self) -> None:
            t0 = time.monotonic()
            url = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(url.query).items()}
            status, body = 200, {}
            try:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if not self._authorized():
                    raise AgentError("unauthenticated", "missing or wrong agent token", 401)
                if raw and self.headers.get_content_type() == "application/json":
                    params.update({k: str(v) for k, v in json.loads(raw).items()})
                elif raw:
                    params.update({k: v[-1] for k, v in parse_qs(raw.decode()).items()})
                if not url.path.startswith("/vma/"):
                    raise AgentError("not_found", "RPC paths are /vma/<method>", 404)
                body = {"ok": True, **self.agent.call(url.path[5:], params)}
            except AgentError as exc:
                status, body = exc.status, {"ok": False, "error": {"code": exc.code, "message": exc.message}}
            except Exception as exc:
                log.exception("internal error")
                status, body = 500, {"ok": False, "error": {"code": "internal", "message": str(exc)}}
            self._send_json(status, body)
            self._log(url.path, status, t0)

        def _send_json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _log(self, path: str, status: int, t0: float, extra: str = "") -> None:
            ms = (time.monotonic() - t0) * 1000
            log.info("%s %s %s %d %.1fms%s", self.client_address[0], self.command, path, status, ms, extra)

        # -- file routes: /files/list, /files/get, /files/put (see FILE_WORKER) ------------------------------
        def _handle_files(self) -> None:
            t0 = time.monotonic()
            url = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            route = (self.command, url.path)
            status, body, extra = 200, None, ""
            try:
                if not self._authorized():
                    raise AgentError("unauthenticated", "missing or wrong agent token", 401)
                if route not in (("GET", "/files/list"), ("GET", "/files/get"), ("PUT", "/files/put")):
                    raise AgentError(
                        "not_found", "file routes are GET /files/list, GET /files/get, PUT /files/put", 404
                    )
                account = file_account(params.get("login", ""))
                if url.path == "/files/list":
                    rel_dir = check_rel_path(params.get("dir", DEFAULT_LIST_DIR), file=False)
                    body = list_files(self.agent.children, account, rel_dir, params.get("hidden") == "1")
                elif url.path == "/files/get":
                    extra = self._send_file(account, check_rel_path(params.get("path", ""), file=True))
                else:
                    body = self._receive_file(account, check_rel_path(params.get("path", ""), file=True))
            except AgentError as exc:
                status, body = exc.status, {"ok": False, "error": {"code": exc.code, "message": exc.message}}
            except Exception as exc:
                log.exception("internal error")
                status, body = 500, {"ok": False, "error": {"code": "internal", "message": str(exc)}}
            if body is not None:
                with contextlib.suppress(OSError):  # the client may be gone (a cut upload)
                    self._send_json(status, body)
                if self.command == "PUT" and status != 200:
                    self._discard_body()
            self._log(url.path, status, t0, extra)

        def _settimeout(self) -> None:
            connection = getattr(self, "connection", None)
            if isinstance(connection, socket.socket):
                connection.settimeout(FILE_IDLE_S)

        def _send_file(self, account: pwd.struct_passwd, rel: str) -> str:
            """Stream the file; errors before the first byte are JSON, after it the connection is cut."""
            self._settimeout()
            worker = FileWorker(self.agent.children, account, ["get", account.pw_dir, rel])
            try:
                size = worker.read_reply().get("size")
                if not isinstance(size, int) or size < 0:
                    raise AgentError("internal", "the file worker answered nonsense", 500)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.send_header("X-Deckard-File-Name", quote(rel.rsplit("/", 1)[-1], safe=""))
                self.end_headers()
                left = size
                try:
                    while left:
                        chunk = worker.read(min(FILE_CHUNK, left))
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        left -= len(chunk)
                except (OSError, AgentError) as exc:
                    self.close_connection = True
                    return f" cut after {size - left} of {size} bytes: {exc}"
                if left:
                    self.close_connection = True
                    return f" cut after {size - left} of {size} bytes: the file shrank"
                return f" {size} bytes"
            finally:
                worker.finish()

        def _receive_file(self, account: pwd.struct_passwd, rel: str) -> dict[str, Any]:
            """Copy the request body to the worker, a chunk at a time, then answer what it wrote."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or "Content-Length" not in self.headers:
                raise AgentError(
                    "length_required", "send the file with a Content-Length (chunked is not supported)", 411
                )
            try:
                size = int(self.headers["Content-Length"])
                limit = int(self.headers.get("X-Deckard-Max-Bytes", "-1"))
            except ValueError:
                raise AgentError("bad_input", "Content-Length and X-Deckard-Max-Bytes must be integers") from None
            if size < 0:
                raise AgentError("bad_input", "Content-Length must not be negative")
            if 0 <= limit < size:
                raise AgentError(
                    "too_large", f"the file is larger than the {limit} bytes allowed: send a smaller one", 413
                )
            self._settimeout()
            worker = FileWorker(self.agent.children, account, ["put", account.pw_dir, rel, str(size)])
            try:
                worker.read_reply()  # ready: the path is good and the temporary file exists
                left = size
                while left:
                    try:
                        chunk = self.rfile.read(min(FILE_CHUNK, left))
                    except OSError:
                        chunk = b""
                    if not chunk:
                        break  # the worker reports the short body
                    left -= len(chunk)
                    if not worker.write(chunk):
                        break  # the worker failed (a full disk): its reply says why
                worker.close_input()
                path = worker.read_reply().get("path")
            finally:
                worker.finish()
            if not isinstance(path, str):
                raise AgentError("internal", "the file worker answered nonsense", 500)
            return {"ok": True, "path": path, "size": size}

        def _discard_body(self) -> None:
            """After an early error answer: the answer goes out with a FIN after it, then the unread body is read and
            dropped for up to ``DISCARD_S`` (until the client, which has the answer, closes).  Closing with unread
            bytes would reset the connection, and a reset can destroy the answer before the client reads it."""
            self.close_connection = True
            connection = getattr(self, "connection", None)
            if not isinstance(connection, socket.socket):
                return
            with contextlib.suppress(OSError):
                self.wfile.flush()
                connection.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + DISCARD_S
                while (wait := deadline - time.monotonic()) > 0:
                    connection.settimeout(wait)
                    if not self.rfile.read1(FILE_CHUNK):
                        break

        # -- /sound?login=: the desktop's sound as Opus (see vma/sound.py) ----------------------------------------
        def _handle_sound(self) -> None:
            t0 = time.monotonic()
            params = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
            status, extra, started = 200, "", False

            def start_response() -> Any:
                nonlocal started
                started = True
                self.send_response(200)
                self.send_header("Content-Type", "application/x-deckard-opus")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()  # no length: the stream ends with the connection
                self.close_connection = True
                return self.wfile

            try:
                if not self._authorized():
                    raise AgentError("unauthenticated", "missing or wrong agent token", 401)
                account = file_account(params.get("login", ""))
                if self.agent.sound is None:
                    raise AgentError("no_sound", "this desktop has no sound (its image has no audio server)", 503)
                self._settimeout()
                extra = SOUND.serve_stream(self.agent.sound, account, start_response, self.connection)
            except Exception as exc:
                if isinstance(exc, AgentError) or (SOUND is not None and isinstance(exc, SOUND.SoundError)):
                    status, code, message = exc.status, exc.code, exc.message
                else:
                    log.exception("internal error")
                    status, code, message = 500, "internal", str(exc)
                if started:
                    self.close_connection = True  # the body had begun: cutting it is the only way to say it failed
                else:
                    self._send_json(status, {"ok": False, "error": {"code": code, "message": message}})
            self._log("/sound", status, t0, extra)

        def _authorized(self) -> bool:
            token = self.agent.token
            header = self.headers.get("Authorization", "")
            if not token or not header.startswith("Bearer "):
                return False
            return compare_digest(header[7:].strip().encode(), token.encode())

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request is written by _handle

    return Handler


def read_token(path: str) -> str | None:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        log.error("cannot read the agent token %s: %s; every call will be refused", path, exc)
        return None
    return token or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deckard-vma", description="Deckard guest agent")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--token-file", default=DEFAULT_TOKEN_FILE)
    parser.add_argument("--no-init", action="store_true", help="run as a normal process (tests on the host)")
    parser.add_argument(
        "--display-for",
        metavar="LOGIN:UID",
        default="",
        help="start this user's display at once (a VM knows its user at boot; a connect then finds it ready)",
    )
    parser.add_argument(
        "--xvnc-pid",
        type=int,
        default=0,
        help="the --display-for user's Xvnc, started by the boot script before this interpreter (a child of ours)",
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="a warm pool's guest: start the display for nobody yet (a user takes it over with take_over)",
    )
    parser.add_argument(
        "--machine",
        choices=("container", "vm"),
        default="container",
        help="vm: PID 1 of a virtual machine (power button, Ctrl-Alt-Del and the final power-off are ours)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s deckard-vma %(message)s")

    is_init = not args.no_init
    if is_init:
        # LXC starts init with an almost empty environment; useradd and friends live in sbin
        os.environ["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        setup_init()
    RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)  # the logs of the display, sound and printing are here
    mounter = None
    if is_init and SHARES is not None and SHARES.has_sys_admin():
        # before any thread: the mounter is a fork, and capabilities are per thread (vma/shares.py)
        mounter = SHARES.Mounter.fork()
        if args.machine == "container" and not SHARES.drop_mount_privileges():
            log.error("cannot drop CAP_SYS_ADMIN: stopping (root in a desktop must not mount)")
            return 1
    agent = Agent(read_token(args.token_file), is_init)
    if mounter is not None:
        agent.nx.shares = SHARES.ShareServer(mounter, agent.share_user)
        agent.nx.shares.start()
    if NX_PRINT is not None and os.access(CUPSD, os.X_OK):
        agent.nx.printers = ClientPrinters(agent.children)
    xvnc = agent.children.adopt(args.xvnc_pid, "Xvnc") if args.xvnc_pid > 0 and args.display_for else None
    if os.getpid() == 1:  # after the adoption: the reaper would take Xvnc's exit for an orphan's
        threading.Thread(target=agent.children.reap_forever, daemon=True, name="reaper").start()
    in_vm = is_init and args.machine == "vm" and os.getpid() == 1
    if in_vm:
        setup_vm(agent.poweroff)
    serving = threading.Event()
    if args.warm:  # only a warm guest's shell is not the user's (XSession.launch)
        threading.Thread(target=serve_launches, args=(agent.x,), daemon=True, name="launches").start()
    if args.display_for or args.warm:  # before the server: the display's slow start overlaps ours
        agent.boot_display_done.clear()

        def display_then_printer() -> None:
            try:
                if xvnc is not None:  # Xvnc is starting already: the session's programs, whose start takes the CPU
                    serving.wait(SESSION_AFTER_SERVER_S)  # our own start needs, begin once we answer
                if args.warm:
                    try:
                        agent.x.prestart(DEFAULT_GEOMETRY)
                    except AgentError as exc:
                        log.warning("no warm display: %s", exc.message)
                else:
                    agent.early_display(args.display_for, xvnc)
            finally:
                agent.boot_display_done.set()
            if is_init:  # then the printer: under a software CPU it would only slow the display down
                agent.printer.start()

        threading.Thread(target=display_then_printer, daemon=True).start()
    elif is_init:
        agent.printer.start()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d", signum)
        threading.Thread(target=agent.poweroff, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGPWR):
        signal.signal(sig, on_signal)

    from http.server import ThreadingHTTPServer

    handler = type("BoundHandler", (handler_class(),), {"agent": agent})
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((args.bind, args.port), handler)
    server.daemon_threads = True
    agent.server = server
    log.info("listening on %s:%d (version %s, init=%s)", args.bind, server.server_address[1], VERSION, is_init)
    serving.set()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    log.info("stopped")
    if in_vm:
        power_off_machine()  # PID 1 of a kernel must not exit: it would panic
    return 0


if __name__ == "__main__":
    sys.exit(main())
