"""A warm guest's shell starts the user's programs through the agent (``vma/agent.py`` ``serve_launches``,
``XSession.launch``; ``vma/opener.py``): who may ask, what a request may be, and that the program runs as the user."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from deckard.vma import agent as vma
from deckard.vma import opener


class Recorder:
    """An XSession's ``launch`` as the server calls it: records the caller's uid and the program."""

    def __init__(self, error: vma.AgentError | None = None) -> None:
        self.calls: list[tuple[int, list[str]]] = []
        self.error = error

    def launch(self, peer_uid: int, argv: list[str]) -> None:
        self.calls.append((peer_uid, argv))
        if self.error is not None:
            raise self.error


def _serve(tmp_path: Path, session: object) -> str:
    path = str(tmp_path / "run" / "launch.sock")
    threading.Thread(target=vma.serve_launches, args=(session, path), daemon=True).start()
    deadline = time.monotonic() + 5
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "the launch socket did not appear"
        time.sleep(0.01)
    return path


def _raw(path: str, data: bytes) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(data)
        return sock.makefile("rb").readline().decode().strip()


def test_a_request_reaches_the_session_with_the_callers_uid_as_the_kernel_says(tmp_path: Path) -> None:
    session = Recorder()
    path = _serve(tmp_path, session)
    assert opener.ask_agent(["xterm", "-geometry", "80x24"], path) == "ok"
    assert session.calls == [(os.getuid(), ["xterm", "-geometry", "80x24"])]
    assert os.stat(path).st_mode & 0o777 == 0o666  # anyone may ask: the uid decides


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"xterm\n", "bad_input"),
        (b"[]\n", "bad_input"),
        (b'["xterm", 3]\n', "bad_input"),
        (b'[""]\n', "bad_input"),
        (b'{"argv": ["xterm"]}\n', "bad_input"),
        (b'["' + b"x" * (vma.MAX_LAUNCH_REQUEST + 1) + b'"]\n', "too_large"),
    ],
)
def test_a_malformed_request_is_refused_with_a_stable_code(tmp_path: Path, data: bytes, code: str) -> None:
    session = Recorder()
    path = _serve(tmp_path, session)
    assert _raw(path, data).startswith(f"error {code}:")
    assert session.calls == []


def test_a_silent_caller_holds_the_agent_two_seconds_at_most(tmp_path: Path) -> None:
    session = Recorder()
    path = _serve(tmp_path, session)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(path)  # says nothing
        t0 = time.monotonic()
        assert opener.ask_agent(["xterm"], path) == "ok"
        assert time.monotonic() - t0 < 4
    assert session.calls == [(os.getuid(), ["xterm"])]


def test_a_caller_that_trickles_its_request_is_cut_off_at_the_deadline(tmp_path: Path) -> None:
    session = Recorder()
    path = _serve(tmp_path, session)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.settimeout(10)
        slow.connect(path)
        t0 = time.monotonic()
        answer = b""
        for _ in range(20):  # one byte every 0.3 s: each read is quick, the whole request is not
            try:
                slow.sendall(b" ")
            except OSError:
                break
            time.sleep(0.3)
            slow.setblocking(False)
            try:
                answer += slow.recv(200)
            except BlockingIOError:
                pass
            finally:
                slow.settimeout(10)
            if answer:
                break
        assert answer.startswith(b"error timeout:"), answer
        assert time.monotonic() - t0 < vma.LAUNCH_REQUEST_S + 1
    assert session.calls == []


def test_the_sessions_refusal_reaches_the_caller(tmp_path: Path) -> None:
    path = _serve(tmp_path, Recorder(vma.AgentError("forbidden", "not you", 403)))
    assert opener.ask_agent(["xterm"], path) == "error forbidden: not you"


def test_only_the_warm_shells_user_may_ask_and_only_once_a_user_took_the_display_over() -> None:
    x = vma.XSession(vma.Children())
    nobody = pwd.getpwnam(vma.WARM_DISPLAY_USER).pw_uid
    with pytest.raises(vma.AgentError) as err:
        x.launch(0, ["xterm"])  # root in the desktop, or the user: they start programs themselves
    assert err.value.code == "forbidden"
    with pytest.raises(vma.AgentError) as err:
        x.launch(nobody, ["xterm"])  # a warm guest nobody took over yet: no user to start it for
    assert err.value.code == "no_session"


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a program as another user needs root")
def test_a_launch_runs_as_the_display_user_from_their_home_with_the_sessions_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setattr(vma, "RUN_DIR", tmp_path)
    account = pwd.getpwnam(vma.WARM_DISPLAY_USER)  # any account not root: the shell's own will do
    home = Path(tempfile.mkdtemp(prefix="deckard-launch-"))  # where that account can go (tmp_path is root's only)
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    home.chmod(0o755)
    os.chown(home, account.pw_uid, account.pw_gid)
    x = vma.XSession(vma.Children())
    x.state, x.user, x.uid = "listening", account.pw_name, account.pw_uid
    x.launch_env = {**vma.user_env(account), "HOME": str(home), "PULSE_SERVER": "unix:/run/pulse"}
    x.launch(account.pw_uid, ["/bin/sh", "-c", 'echo "$(id -u) $(pwd) $PULSE_SERVER" > out'])
    out = home / "out"
    deadline = time.monotonic() + 10
    while not (out.exists() and out.read_text()):
        assert time.monotonic() < deadline, (tmp_path / "session.log").read_text()
        time.sleep(0.02)
    assert out.read_text().split() == [str(account.pw_uid), str(home), "unix:/run/pulse"]
    assert out.stat().st_uid == account.pw_uid


def test_deckard_open_run_by_the_user_is_the_program_itself() -> None:
    done = subprocess.run(
        [sys.executable, "-IS", opener.__file__, "sh", "-c", "echo $$ started"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.endswith("started\n"), done.stderr


def test_deckard_open_without_a_program_says_how_to_use_it() -> None:
    done = subprocess.run([sys.executable, "-IS", opener.__file__], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "usage: deckard-open PROGRAM" in done.stderr
