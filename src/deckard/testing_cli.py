"""Run ``python -m deckard.cli.main …`` for tests without paying the interpreter's start and the CLI's imports.

A farm test runs the ``deckard`` command hundreds of times; each run spent about 0.5 s of a core starting Python
and importing the CLI (Typer, Rich, httpx, pydantic and every command module) before doing anything, more than
the command itself.  ``run_cli`` forks each run from a server process that imported all that once: the child is
still a process of its own, with the command's arguments, environment, working directory and standard streams,
runs ``deckard.cli.main`` as ``__main__`` as ``python -m`` does, and exits with the command's code.  What the
command then starts (``deckard up``'s farm, nodes) are ordinary processes, as before.

One server per test process, started at the first run and gone with it (it exits when its stdin closes).  It
holds no thread (a fork copies only the forking one) and no event loop.  Only with ``DECKARD_TEST_CLI_FORK=1``
(tests/conftest.py sets it): benchmarks and demos time what a user's command costs, interpreter start included,
so without it, or with an environment whose terminal settings differ from the server's (Rich reads them at
import), ``run_cli`` is ``subprocess.run``.
"""

from __future__ import annotations

import atexit
import json
import locale
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

MODULE = "deckard.cli.main"
# the command modules deckard.cli.main imports when it runs, imported once in the server (not deckard.cli.main
# itself: each child runs it as __main__, as ``python -m`` does)
PRELOAD = (
    "deckard.cli.admin",
    "deckard.cli.connect",
    "deckard.cli.farm",
    "deckard.cli.identity",
    "deckard.cli.storage",
    "deckard.cli.volumes",
    "rich.progress",
)
# read by Rich when the server imports it (module-level consoles): a run whose values differ is not forked
TERMINAL_ENV = ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TERM", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


class _Server:
    def __init__(self, env: dict[str, str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="deckard-cli-"))
        self.path = self.dir / "socket"
        self.terminal = {k: env.get(k) for k in TERMINAL_ENV}
        code = f"from deckard.testing_cli import _serve; _serve({str(self.path)!r})"
        log = self.dir / "server.log"
        with open(log, "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code],
                env={k: v for k, v in env.items() if not k.startswith("DECKARD_")},  # no farm's in particular
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=logf,
            )
        deadline = time.monotonic() + 60
        while not self.path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = log.read_text(errors="replace")
                self.close()
                raise RuntimeError(f"the CLI fork server did not start: {err}")
            time.sleep(0.02)

    def fits(self, env: dict[str, str]) -> bool:
        return self.proc.poll() is None and all(env.get(k) == v for k, v in self.terminal.items())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


_server: _Server | None = None
_server_lock = threading.Lock()


def _server_for(env: dict[str, str]) -> _Server | None:
    global _server
    if os.environ.get("DECKARD_TEST_CLI_FORK") != "1":
        return None
    with _server_lock:
        if _server is None or _server.proc.poll() is not None:
            _server = _Server(env)
            atexit.register(_server.close)
        return _server if _server.fits(env) else None


def run_cli(
    args: list[str], env: dict[str, str], *, input: str | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run([sys.executable, "-m", "deckard.cli.main", *args], env=env, text=True,
    capture_output=True, input=input, timeout=timeout)``, forked from the server."""
    argv = [sys.executable, "-m", MODULE, *args]
    server = _server_for(env)
    if server is None:
        return subprocess.run(argv, env=env, text=True, capture_output=True, input=input, timeout=timeout)
    with (
        tempfile.TemporaryFile() as stdin,
        tempfile.TemporaryFile() as stdout,
        tempfile.TemporaryFile() as stderr,
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn,
    ):
        if input is not None:
            stdin.write(input.encode(locale.getpreferredencoding(False)))
            stdin.seek(0)
        conn.connect(str(server.path))
        request = json.dumps({"args": args, "env": env, "cwd": os.getcwd()}).encode()
        socket.send_fds(conn, [request], [stdin.fileno(), stdout.fileno(), stderr.fileno()])
        conn.settimeout(timeout)
        pid = int(json.loads(conn.recv(1024))["pid"])
        try:
            reply = conn.recv(1024)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)  # as subprocess.run does: kill the command, then say it timed out
            conn.settimeout(None)
            conn.recv(1024)
            raise subprocess.TimeoutExpired(argv, timeout or 0.0) from None
        returncode = int(json.loads(reply)["returncode"])
        out, err = (_text(f) for f in (stdout, stderr))
    return subprocess.CompletedProcess(argv, returncode, out, err)


def _text(f: Any) -> str:
    """The captured bytes as ``text=True`` gives them (locale encoding, universal newlines)."""
    f.seek(0)
    data: bytes = f.read()
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


# ---- the server (a process of its own) -------------------------------------------------------------------


def _serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # the client waits for the path: it exists once connects are accepted
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(sys.stdin, selectors.EVENT_READ, "parent")  # EOF: the test process is gone
    while True:
        for key, _events in sel.select():
            if key.data == "parent":
                if not os.read(sys.stdin.fileno(), 1):
                    return
            elif key.data == "accept":
                conn, _ = listener.accept()
                msg, fds, _flags, _addr = socket.recv_fds(conn, 1 << 22, 3)
                pid = os.fork()
                if pid == 0:
                    _child(json.loads(msg), fds, [conn, listener], sel)
                for fd in fds:
                    os.close(fd)
                conn.send(json.dumps({"pid": pid}).encode())
                sel.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, conn))
            else:
                pid, conn = key.data
                sel.unregister(key.fileobj)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                try:
                    conn.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
                except OSError:
                    pass  # the caller gave up (a test that failed meanwhile)
                conn.close()


def _child(request: dict[str, Any], fds: list[int], sockets: list[socket.socket], sel: Any) -> None:
    """Become ``python -m deckard.cli.main <args>``; never returns."""
    code = 1
    try:
        sel.close()
        for s in sockets:
            s.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["-m", *request["args"]]
        sys.path[0] = request["cwd"]  # python -m puts the working directory first
        import runpy

        try:
            runpy._run_module_as_main(MODULE)  # type: ignore[attr-defined]
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        threading._shutdown()  # type: ignore[attr-defined]  # what the interpreter's exit does: threads, then atexit
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)
