"""The guest agent's file routes: users upload into and download from their desktop's home, through the broker.

The worker code (``FILE_WORKER``, run as the desktop user in a child process) is exercised in-process on a
temporary home; the HTTP routes run against a real agent subprocess acting for a throwaway account (made with
``useradd``, so those tests need root), which also proves that files are written with the user's uid, not root's.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_vma import wait_listening

from deckard.client.agent_files import AgentFileError, AgentFiles
from deckard.testing import free_port
from deckard.vma import agent as vma

TOKEN = "s3cret-agent-token"


# -- the worker, in-process --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker() -> SimpleNamespace:
    namespace: dict[str, Any] = {"__name__": "deckard_file_worker"}
    exec(compile(vma.FILE_WORKER, "<FILE_WORKER>", "exec"), namespace)
    return SimpleNamespace(**namespace)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def put(worker: SimpleNamespace, home: Path, rel: str, data: bytes, size: int | None = None) -> str:
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb") as f:
        f.write(data)  # small enough for the pipe's buffer
    try:
        path: str = worker.put_file(str(home), rel, len(data) if size is None else size, read_end, lambda _: None)
    finally:
        os.close(read_end)
    return path


def error_code(worker: SimpleNamespace, call: Any) -> str:
    with pytest.raises((worker.FileError, OSError)) as info:
        call()
    return str(worker.error_of(info.value)[0])


def test_listing_puts_directories_first_then_files_by_name_and_hides_dotfiles(worker: SimpleNamespace, home: Path):
    for name in ("b.txt", "A.txt", ".secret"):
        (home / name).write_bytes(b"xy")
    for name in ("zeta", "Alpha"):
        (home / name).mkdir()
    listing = worker.list_dir(str(home), "", False)
    assert [(e["name"], e["type"]) for e in listing["entries"]] == [
        ("Alpha", "dir"),
        ("zeta", "dir"),
        ("A.txt", "file"),
        ("b.txt", "file"),
    ]
    assert listing["entries"][2]["size"] == 2 and listing["truncated"] is False
    assert ".secret" in [e["name"] for e in worker.list_dir(str(home), "", True)["entries"]]


def test_listing_a_missing_downloads_is_empty_but_another_missing_dir_is_not_found(worker, home: Path):
    assert worker.list_dir(str(home), "Downloads", False) == {"entries": [], "truncated": False}
    assert error_code(worker, lambda: worker.list_dir(str(home), "Nope", False)) == "not_found"


def test_listing_stops_at_1000_entries_and_says_so(worker: SimpleNamespace, home: Path):
    for i in range(1001):
        (home / f"f{i:04}").touch()
    listing = worker.list_dir(str(home), "", False)
    assert len(listing["entries"]) == 1000 and listing["truncated"] is True


def test_uploads_never_overwrite_they_take_the_next_free_name(worker: SimpleNamespace, home: Path):
    assert put(worker, home, "Uploads/x.txt", b"one") == "Uploads/x.txt"
    assert put(worker, home, "Uploads/x.txt", b"two") == "Uploads/x (1).txt"
    assert put(worker, home, "Uploads/x.txt", b"three") == "Uploads/x (2).txt"
    assert (home / "Uploads/x.txt").read_bytes() == b"one"
    assert (home / "Uploads/x (2).txt").read_bytes() == b"three"
    assert oct((home / "Uploads").stat().st_mode & 0o777) == "0o755"
    assert sorted(p.name for p in (home / "Uploads").iterdir()) == ["x (1).txt", "x (2).txt", "x.txt"]


def test_a_short_upload_leaves_no_file_behind(worker: SimpleNamespace, home: Path):
    (home / "Uploads").mkdir()
    assert error_code(worker, lambda: put(worker, home, "Uploads/x.bin", b"abc", size=10)) == "short_body"
    assert list((home / "Uploads").iterdir()) == []


def test_a_full_disk_answers_disk_full_and_leaves_no_file(worker: SimpleNamespace, home: Path, monkeypatch):
    def no_space(_fd: int, _data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)  # the worker's os is this os
    with pytest.raises(OSError) as info:
        put(worker, home, "Uploads/x.bin", b"abc")
    monkeypatch.undo()
    assert worker.error_of(info.value)[::2] == ("disk_full", 507)
    assert list((home / "Uploads").iterdir()) == []


def test_symlinks_that_leave_the_home_are_refused(worker: SimpleNamespace, home: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("root's")
    (home / "etc").symlink_to(outside)
    (home / "Downloads").mkdir()
    (home / "Downloads/secret").symlink_to(outside / "secret")
    h = str(home)
    assert error_code(worker, lambda: worker.list_dir(h, "etc", False)) == "outside_home"
    assert error_code(worker, lambda: worker.open_file(h, "etc/secret")) == "outside_home"
    assert error_code(worker, lambda: worker.open_file(h, "Downloads/secret")) == "outside_home"
    assert error_code(worker, lambda: put(worker, home, "etc/new", b"x")) == "outside_home"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_a_symlinked_final_component_is_never_followed(worker: SimpleNamespace, home: Path):
    (home / "real.txt").write_text("real")
    (home / "link.txt").symlink_to(home / "real.txt")
    assert error_code(worker, lambda: worker.open_file(str(home), "link.txt")) == "not_a_file"
    # an upload to the link's name takes a free name and leaves the link and its target alone
    assert put(worker, home, "link.txt", b"new") == "link (1).txt"
    assert (home / "link.txt").is_symlink() and (home / "real.txt").read_text() == "real"


def test_a_directory_or_a_fifo_is_not_a_file(worker: SimpleNamespace, home: Path):
    (home / "dir").mkdir()
    os.mkfifo(home / "fifo")
    assert error_code(worker, lambda: worker.open_file(str(home), "dir")) == "not_a_file"
    assert error_code(worker, lambda: worker.open_file(str(home), "fifo")) == "not_a_file"


def test_a_directory_symlinked_in_from_a_race_is_not_walked_through(worker: SimpleNamespace, home: Path, tmp_path):
    """open_dir never follows a symlink, even one that appears after realpath checked the path."""
    (home / "d").symlink_to(tmp_path)
    assert error_code(worker, lambda: worker.open_dir(str(home), ["d"], False)) == "outside_home"


@pytest.mark.parametrize(
    "rel",
    ["../etc/passwd", "/etc/passwd", "Downloads/../../x", "a/../b", "a\0b", "x" * 4097, "", ".", "dir/"],
)
def test_bad_paths_are_refused_before_anything_runs(rel: str):
    with pytest.raises(vma.AgentError) as info:
        vma.check_rel_path(rel, file=True)
    assert (info.value.code, info.value.status) == ("bad_path", 400)


def test_paths_are_normalised():
    assert vma.check_rel_path("./Downloads//a.txt", file=True) == "Downloads/a.txt"
    assert vma.check_rel_path(".", file=False) == ""
    assert vma.check_rel_path("Downloads/", file=False) == "Downloads"


# -- the HTTP routes, as a real desktop user --------------------------------------------------------------
@pytest.fixture(scope="module")
def desktop_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("the HTTP file routes act as another user: run as root with useradd")
    used = {p.pw_uid for p in pwd.getpwall()}
    uid = next(u for u in range(60000, 65000) if u not in used)
    login = f"deckardtest{os.getpid() % 100000}"
    home = tempfile.mkdtemp(prefix="deckard-files-", dir="/tmp")
    subprocess.run(
        ["useradd", "-M", "-U", "-u", str(uid), "-d", home, "-s", "/usr/sbin/nologin", login],
        check=True,
        capture_output=True,
    )
    try:
        account = pwd.getpwnam(login)
        os.chown(home, account.pw_uid, account.pw_gid)
        os.chmod(home, 0o750)
        yield account
    finally:
        subprocess.run(["userdel", login], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def python_for(account: pwd.struct_passwd) -> str:
    """An interpreter the desktop user may run (the agent's worker runs as them with the agent's python;
    a virtualenv under root's home is out of their reach, a desktop image's /usr/bin/python3 is not)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            probe = subprocess.run(
                [candidate, "-I", "-S", "-c", "pass"], user=account.pw_uid, group=account.pw_gid, cwd="/", check=False
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    pytest.skip("no python3 the test user may run (the agent's worker runs as the user)")


@pytest.fixture(scope="module")
def agent_url(tmp_path_factory: pytest.TempPathFactory, desktop_user: pwd.struct_passwd) -> Iterator[str]:
    token_file = tmp_path_factory.mktemp("agent") / "agent-token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    args = ["--no-init", "--bind", "127.0.0.1", "--port", str(port), "--token-file", str(token_file)]
    python = python_for(desktop_user)
    proc = subprocess.Popen([python, "-I", vma.__file__, *args], stderr=subprocess.DEVNULL)
    try:
        wait_listening(proc, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(5)


def request(
    url: str, method: str = "GET", data: bytes | None = None, headers: dict[str, str] | None = None, token=TOKEN
) -> tuple[int, dict[str, str], bytes]:
    all_headers = {"Authorization": f"Bearer {token}"} if token else {}
    all_headers.update(headers or {})
    req = urllib.request.Request(url, data=data, headers=all_headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def raw_request(agent_url: str, head: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """A request written by hand on a socket, then half-closed (a client that goes away)."""
    host, port = agent_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode() + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode() + body)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_upload_then_download_gives_the_same_bytes_written_as_the_user(agent_url: str, desktop_user):
    data = os.urandom(3 * 1024 * 1024 + 17)
    login = desktop_user.pw_name
    status, _, body = request(f"{agent_url}/files/put?login={login}&path=Uploads/r%C3%A9sum%C3%A9.bin", "PUT", data)
    assert status == 200, body
    assert json.loads(body) == {"ok": True, "path": "Uploads/résumé.bin", "size": len(data)}
    written = Path(desktop_user.pw_dir) / "Uploads/résumé.bin"
    st = written.stat()
    assert (st.st_uid, st.st_gid) == (desktop_user.pw_uid, desktop_user.pw_gid)
    assert written.parent.stat().st_uid == desktop_user.pw_uid
    status, headers, got = request(f"{agent_url}/files/get?login={login}&path=Uploads/r%C3%A9sum%C3%A9.bin")
    assert status == 200 and got == data
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Length"] == str(len(data))
    assert headers["X-Deckard-File-Name"] == "r%C3%A9sum%C3%A9.bin"
    status, _, body = request(f"{agent_url}/files/put?login={login}&path=Uploads/r%C3%A9sum%C3%A9.bin", "PUT", b"2")
    assert json.loads(body)["path"] == "Uploads/résumé (1).bin"


async def _download(url: str, login: str, path: str) -> tuple[str, int, bytes]:
    """A file through the broker's client of the agent (``AgentFiles.download``)."""
    async with _agent(url, login).download(path) as (name, size, chunks):
        return name, size, b"".join([chunk async for chunk in chunks])


def _agent(url: str, login: str) -> AgentFiles:
    host, port = url.removeprefix("http://").split(":")
    return AgentFiles(host, TOKEN, login, port=int(port), timeout=5)


async def _pieces(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_the_brokers_client_streams_both_ways_and_keeps_the_agents_refusals(agent_url: str, desktop_user):
    data = os.urandom(5 * 1024 * 1024 + 3)
    agent = _agent(agent_url, desktop_user.pw_name)
    assert await agent.upload("Transfers/big one.bin", len(data), _pieces(data), len(data)) == {
        "path": "Transfers/big one.bin",
        "size": len(data),
    }
    assert await _download(agent_url, desktop_user.pw_name, "Transfers/big one.bin") == ("big one.bin", len(data), data)
    with pytest.raises(AgentFileError) as refused:
        await _download(agent_url, desktop_user.pw_name, "Transfers/nope.bin")
    assert refused.value.code == "not_found"
    with pytest.raises(AgentFileError) as too_large:  # refused up front: the rest of the body is not sent
        await agent.upload("Transfers/more.bin", len(data), _pieces(data), len(data) - 1)
    assert too_large.value.code == "too_large"
    assert not (Path(desktop_user.pw_dir) / "Transfers/more.bin").exists()


async def test_the_brokers_client_calls_a_download_cut_short_unreachable() -> None:
    async def cut(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Deckard-File-Name: a.bin\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        with pytest.raises(AgentFileError) as cut_short:
            await _download(url, "someone", "a.bin")
    assert cut_short.value.code == "agent_unreachable"


def test_listing_over_http(agent_url: str, desktop_user):
    login = desktop_user.pw_name
    status, _, body = request(f"{agent_url}/files/list?login={login}")
    assert status == 200 and json.loads(body) == {"ok": True, "dir": "Downloads", "entries": [], "truncated": False}
    request(f"{agent_url}/files/put?login={login}&path=Listed/a.txt", "PUT", b"abc")
    status, _, body = request(f"{agent_url}/files/list?login={login}&dir=Listed/")
    listing = json.loads(body)
    assert listing["dir"] == "Listed"
    assert [(e["name"], e["type"], e["size"]) for e in listing["entries"]] == [("a.txt", "file", 3)]
    status, _, body = request(f"{agent_url}/files/list?login={login}&dir=Missing")
    assert (status, json.loads(body)["error"]["code"]) == (404, "not_found")


def test_traversal_is_refused(agent_url: str, desktop_user):
    login = desktop_user.pw_name
    os.symlink("/etc", os.path.join(desktop_user.pw_dir, "sys-etc"))
    cases = {
        "path=../etc/passwd": (400, "bad_path"),
        "path=/etc/passwd": (400, "bad_path"),
        "path=Downloads/../../x": (400, "bad_path"),
        "path=sys-etc/passwd": (403, "outside_home"),
        "path=sys-etc": (403, "outside_home"),
        "path=Uploads": (400, "not_a_file"),
    }
    for query, expected in cases.items():
        status, _, body = request(f"{agent_url}/files/get?login={login}&{query}")
        assert (status, json.loads(body)["error"]["code"]) == expected, query
    status, _, body = request(f"{agent_url}/files/put?login={login}&path=sys-etc/evil", "PUT", b"x")
    assert (status, json.loads(body)["error"]["code"]) == (403, "outside_home")
    assert not os.path.exists("/etc/evil")


def test_a_cut_upload_leaves_no_file(agent_url: str, desktop_user):
    login = desktop_user.pw_name
    head = f"PUT /files/put?login={login}&path=Cut/x.bin HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n"
    status, body = raw_request(agent_url, head, b"x" * 100)
    assert (status, body["error"]["code"]) == (400, "short_body")
    assert os.listdir(os.path.join(desktop_user.pw_dir, "Cut")) == []


def test_uploads_need_a_length_within_the_limit(agent_url: str, desktop_user):
    login = desktop_user.pw_name
    head = f"PUT /files/put?login={login}&path=Big/x.bin HTTP/1.1\r\nHost: a\r\n"
    status, body = raw_request(agent_url, head + "Content-Length: 2048\r\nX-Deckard-Max-Bytes: 1024\r\n", b"x" * 2048)
    assert (status, body["error"]["code"]) == (413, "too_large")
    status, body = raw_request(agent_url, head, b"")
    assert (status, body["error"]["code"]) == (411, "length_required")
    assert not os.path.exists(os.path.join(desktop_user.pw_dir, "Big"))


def test_calls_without_the_token_or_for_an_unknown_user_are_refused(agent_url: str, desktop_user):
    for route, method in (("list", "GET"), ("get", "GET"), ("put", "PUT")):
        url = f"{agent_url}/files/{route}?login={desktop_user.pw_name}&path=x"
        status, _, body = request(url, method, b"x" if method == "PUT" else None, token=None)
        assert (status, json.loads(body)["error"]["code"]) == (401, "unauthenticated")
    status, _, body = request(f"{agent_url}/files/list?login=nosuchuser")
    assert (status, json.loads(body)["error"]["code"]) == (409, "no_user")
