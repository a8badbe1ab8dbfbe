"""The guest agent's RPC surface, run on the host with ``--no-init`` (no X is started here).

The agent runs as a real subprocess on 127.0.0.1 and a free port, exactly as inside a desktop minus the
init duties, so these tests exercise its HTTP server, token check and error envelope for real.
"""

from __future__ import annotations

import ast
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from deckard.testing import free_port
from deckard.vma import agent as vma

TOKEN = "s3cret-agent-token"


def agent_command(port: int, token_file: Path) -> list[str]:
    args = ["--no-init", "--bind", "127.0.0.1", "--port", str(port), "--token-file", str(token_file)]
    return [sys.executable, vma.__file__, *args]


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 10) -> None:
    """Until the agent started as ``proc`` accepts connections on loopback ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "agent exited"
        assert time.monotonic() < deadline, f"agent did not listen within {timeout:g} s"
        time.sleep(0.02)


@pytest.fixture
def agent_url(tmp_path: Path) -> Iterator[str]:
    token_file = tmp_path / "agent-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    proc = subprocess.Popen(
        agent_command(port, token_file),
        stderr=subprocess.PIPE,
    )
    try:
        wait_listening(proc, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def call(url: str, token: str | None = TOKEN, method: str = "GET", body: bytes | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, headers=headers, method=method, data=body)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_calls_without_the_token_are_refused(agent_url: str) -> None:
    for token in (None, "wrong-token", ""):
        status, body = call(f"{agent_url}/vma/ping", token=token)
        assert status == 401
        assert body == {"ok": False, "error": {"code": "unauthenticated", "message": "missing or wrong agent token"}}


def test_ping_answers_version_and_display_state(agent_url: str) -> None:
    status, body = call(f"{agent_url}/vma/ping")
    assert status == 200
    assert body == {"ok": True, "version": vma.VERSION, "x_state": "stopped", "protocol": "vnc"}


def test_x_state_is_stopped_before_any_start(agent_url: str) -> None:
    status, body = call(f"{agent_url}/vma/x_state", method="POST")
    assert (status, body["ok"], body["state"]) == (200, True, "stopped")


def test_unknown_method_is_404_with_a_stable_code(agent_url: str) -> None:
    for path in ("/vma/nope", "/vma/__init__", "/other"):
        status, body = call(f"{agent_url}{path}")
        assert status == 404
        assert body["ok"] is False and body["error"]["code"] in ("unknown_method", "not_found")


def test_x_start_rejects_bad_input_before_touching_the_system(agent_url: str) -> None:
    cases = {
        "user=Root&uid=10001": "user must be",
        "user=alice&uid=abc": "uid must be an integer",
        "user=alice&uid=0": "uid must be between",
        "user=alice&uid=10001&geometry=huge": "geometry",
        "user=alice&uid=10001&keyboard=de%3Brm": "keyboard must be an XKB layout",
        "user=alice&uid=10001&keyboard=German": "keyboard must be an XKB layout",
    }
    for query, message in cases.items():
        status, body = call(f"{agent_url}/vma/x_start?{query}")
        assert status == 400 and body["error"]["code"] == "bad_input"
        assert message in body["error"]["message"]
    status, body = call(f"{agent_url}/vma/x_start", method="POST", body=json.dumps({"user": "Bad!"}).encode())
    assert status == 400 and body["error"]["code"] == "bad_input"


def test_poweroff_answers_then_the_agent_exits(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    proc = subprocess.Popen(
        agent_command(port, token_file),
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(500):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.02)
        status, body = call(f"http://127.0.0.1:{port}/vma/poweroff")
        assert (status, body) == (200, {"ok": True, "state": "stopping"})
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("netlink", [True, False], ids=["sock_diag", "proc"])
def test_vnc_connected_reads_established_connections(netlink: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not netlink:  # a desktop where netlink is refused reads the text tables

        def refused(_port: int) -> bool:
            raise PermissionError("netlink refused")

        monkeypatch.setattr(vma, "_established_on", refused)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        assert vma.vnc_connected(port) is False
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        assert vma.vnc_connected(port) is True
        client.close()
        conn.close()
    finally:
        server.close()


def test_agent_uses_the_standard_library_only() -> None:
    """An image needs nothing but python3: every import of the agent and of its sound module (which an image
    carries beside it) is in the standard library, but the sound module itself."""
    for source in (Path(vma.__file__), Path(vma.__file__).with_name("sound.py")):
        tree = ast.parse(source.read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules.update(f"{node.module}.{alias.name}" for alias in node.names)
        outside = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names}
        assert outside <= {"deckard.vma.sound"}, (source.name, outside)


def test_exec_runs_a_command_and_caps_its_input(agent_url: str) -> None:
    status, body = call(f"{agent_url}/vma/exec?command=echo+hello%3B+echo+oops+1%3E%262%3B+exit+3")
    assert status == 200 and body["returncode"] == 3
    assert body["stdout"] == "hello\n" and body["stderr"] == "oops\n"
    for query, code in (
        ("command=", "bad_input"),
        ("command=true&timeout=0", "bad_input"),
        ("command=true&timeout=31", "bad_input"),
        ("command=true&timeout=x", "bad_input"),
        ("command=true&user=root%3Bsh", "bad_input"),
        ("command=sleep+5&timeout=0.3", "exec_timeout"),
    ):
        status, body = call(f"{agent_url}/vma/exec?{query}")
        assert status in (400, 504) and body["error"]["code"] == code, (query, body)


def test_x_start_waits_for_the_display_started_at_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connect's ``x_start`` that comes while the boot script's display is still being adopted waits for it: it
    must find that display (``already``), not start a second one beside it and end the first."""
    agent = vma.Agent("token", is_init=False)
    started: list[str] = []
    monkeypatch.setattr(agent.x, "start", lambda login, *_a, **_k: started.append(login) or {"state": "listening"})
    agent.boot_display_done.clear()
    answer: list[dict] = []
    caller = threading.Thread(target=lambda: answer.append(agent.rpc_x_start({"user": "ann", "uid": "10001"})))
    caller.start()
    time.sleep(0.2)
    assert started == [] and caller.is_alive()
    agent.boot_display_done.set()
    caller.join(5)
    assert started == ["ann"] and answer[0]["protocol"] == "vnc"


def test_a_poweroff_waits_for_the_processes_left_only_until_they_are_gone(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for name, ppid in (("1", 0), ("2", 0), ("3", 2), ("42", 1)):  # init, kthreadd and a kernel thread, a process
        (proc / name).mkdir(parents=True)
        (proc / name / "stat").write_text(f"{name} (a (b) c) S {ppid} 1 1 0 -1\n")
    (proc / "self").mkdir()
    t0 = time.monotonic()
    assert not vma.alone_within(0.05, proc)  # one left: the grace runs out
    assert time.monotonic() - t0 >= 0.05
    threading.Timer(0.05, shutil.rmtree, (proc / "42",)).start()
    t0 = time.monotonic()
    assert vma.alone_within(5, proc) and time.monotonic() - t0 < 1  # gone: no wait beyond it


def test_the_agents_server_stops_at_once_not_at_its_next_poll() -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 30})
    serving.start()
    try:
        time.sleep(0.05)
        t0 = time.monotonic()
        vma.shut_down(server)
        serving.join(5)
        assert not serving.is_alive() and time.monotonic() - t0 < 2
    finally:
        server.server_close()
