"""Shared folders over the NX slave channel: the desktop's slave command (vma/nx_slave.py) reads QVD's requests,
the broker's key reaches the agent checked, and the mounter's paths never follow a link (vma/shares.py)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from deckard.broker.nx import SLAVE_KEY_ALPHABET, NxOptions, new_slave_key
from deckard.vma import agent as vma
from deckard.vma import nx_slave, shares
from deckard.vma.nx_slave import Request, SlaveError

KEY = "k" * 64


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_qvds_perl_client_request_is_read_a_byte_at_a_time_leaving_sftp_unread() -> None:
    """QVD's Perl client: the path unescaped (``/shares//home/u``), no Host; SFTP's first bytes follow at once."""
    a, b = socket.socketpair()
    with a, b:
        request = head(
            "PUT /shares//home/ana/My Docs HTTP/1.1",
            f"Authorization: Basic {KEY}",
            "Connection: Upgrade",
            "Upgrade: qvd:sftp/1.0",
            "User-Agent: QVD::HTTPC/0.01",
        )
        a.sendall(request + b"\x00\x00\x00\x05\x01")  # SSH_FXP_INIT
        raw = nx_slave.read_head(b.fileno())
        assert raw == request and b.recv(5) == b"\x00\x00\x00\x05\x01"
    req = nx_slave.parse_head(raw)
    assert (req.method, req.path) == ("PUT", "/shares//home/ana/My Docs")
    nx_slave.authorize(req, KEY)
    assert nx_slave.upgrade_charset(req) == "utf-8"


def test_the_qt_clients_encoded_path_and_charset_are_understood() -> None:
    req = nx_slave.parse_head(
        head(
            "PUT /shares/C%3A%5CUsers%5Cana%5CDocuments HTTP/1.1",
            "Host: localhost",
            "Connection: Upgrade",
            "Upgrade: qvd:sftp/1.0;charset=ISO-8859-1",
        )
    )
    assert req.path == "/shares/C:\\Users\\ana\\Documents"
    assert nx_slave.share_name(req.path[len("/shares/") :]) == "Documents"
    assert nx_slave.upgrade_charset(req) == "iso-8859-1"
    assert nx_slave.sshfs_args(5, "iso-8859-1")[-2:] == ["-o", "modules=iconv,from_code=iso-8859-1,to_code=utf-8"]
    assert nx_slave.sshfs_args(5, "utf-8") == [
        nx_slave.SSHFS,
        "qvd-client:",
        "/dev/fd/5",
        "-o",
        "slave",
        "-o",
        "idmap=user",
    ]


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/home/ana/docs/", "docs"),
        ("C:\\", "C"),
        ("/", "Root"),
        ("", "Root"),
        ("D:", "D"),
        ("/media/usb:", "usb"),
        ("/x/..", "Root"),
        ("C:\\Users\\ana", "ana"),
    ],
)
def test_share_names_follow_qvd(path: str, name: str) -> None:
    assert nx_slave.share_name(path) == name
    assert shares.valid_name(nx_slave.share_name(path))


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        (("PUT /shares/x HTTP/1.1",), 401),  # no key: QVD's 401 with its realm
        (("PUT /shares/x HTTP/1.1", "Authorization: Basic " + "x" * 64), 403),
        (("PUT /shares/x HTTP/1.1", "Authorization: Bearer " + KEY), 401),
    ],
)
def test_requests_without_this_connections_key_are_refused(lines: tuple[str, ...], status: int) -> None:
    with pytest.raises(SlaveError) as refused:
        nx_slave.authorize(nx_slave.parse_head(head(*lines)), KEY)
    assert refused.value.status == status
    if status == 401:
        assert refused.value.headers == (("WWW-Authenticate", 'Basic realm="QVD"'),)
    with pytest.raises(SlaveError):  # no key written for this connection: nothing passes
        nx_slave.authorize(nx_slave.parse_head(head("PUT /x HTTP/1.1", "Authorization: Basic ")), "")


@pytest.mark.parametrize(
    "raw",
    [
        b"PUT /shares/x HTTP/1.0\r\n\r\n",
        b"PUT /shares/x\r\n\r\n",
        b"PUT /shares/x HTTP/1.1\r\nbad line\r\n\r\n",
        b"PUT /\xff HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_heads_are_400(raw: bytes) -> None:
    with pytest.raises(SlaveError) as refused:
        nx_slave.parse_head(raw)
    assert refused.value.status == 400


def test_an_endless_head_or_another_upgrade_is_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        threading.Thread(target=lambda: a.sendall(b"X" * (nx_slave.MAX_HEAD + 10)), daemon=True).start()
        with pytest.raises(SlaveError, match="over"):
            nx_slave.read_head(b.fileno())
    with pytest.raises(SlaveError, match="Upgrade"):
        nx_slave.upgrade_charset(Request("PUT", "/shares/x", {"connection": "Upgrade", "upgrade": "websocket"}))
    with pytest.raises(SlaveError, match="Connection"):
        nx_slave.upgrade_charset(Request("PUT", "/shares/x", {"upgrade": "qvd:sftp/1.0"}))


def test_responses_are_qvds() -> None:
    assert nx_slave.response(101, (("X-QVD-Share-Ticket", "docs"),)) == (
        b"HTTP/1.1 101 Switching Protocols\r\nX-QVD-Share-Ticket: docs\r\n\r\n"
    )
    refused = nx_slave.response(409, body="in use\n")
    assert refused.startswith(b"HTTP/1.1 409 Conflict\r\n") and refused.endswith(b"Content-Length: 7\r\n\r\nin use\n")


def test_the_broker_key_reaches_the_agent_checked() -> None:
    key = new_slave_key()
    assert len(key) == 64 and set(key) <= set(SLAVE_KEY_ALPHABET) and key != new_slave_key()
    params = NxOptions().agent_params(key)
    assert vma.parse_nx_params(params)["slave_key"] == key
    assert "nx_slave_key" not in NxOptions().agent_params()  # shares off: no key, every request refused
    with pytest.raises(vma.AgentError, match="nx_slave_key"):
        vma.parse_nx_params({**params, "nx_slave_key": "short;rm"})
    assert "slave=1" in vma.nx_options_line(vma.parse_nx_params(params), "800x600", "c" * 32).split(",")


@pytest.mark.skipif(os.geteuid() != 0, reason="setfsuid, as the mounter does, needs root")
def test_the_mounter_never_follows_a_link_the_user_planted() -> None:
    """A link at ~/Redirected or at the share's place is refused (the mount would land on its target), and a
    folder the user does not own is not used.  (Mounting itself is checked in a real desktop: tests/e2e.)"""
    top = Path(tempfile.mkdtemp(prefix="deckard-shares-", dir="/tmp"))  # the user may walk to their home
    try:
        _refusals(top)
    finally:
        shutil.rmtree(top)


def _refusals(top: Path) -> None:
    top.chmod(0o755)
    home = top / "home"
    home.mkdir()
    os.chown(home, 4242, 4242)
    (home / "Redirected").symlink_to("/etc")
    with pytest.raises(shares.ShareError) as refused:
        shares.mount_share(str(home), 4242, 4242, "docs")
    assert refused.value.code == "share_refused" and not Path("/etc/docs").exists()
    (home / "Redirected").unlink()
    (home / "Redirected").mkdir()
    os.chown(home / "Redirected", 4242, 4242)
    (home / "Redirected" / "docs").symlink_to("/etc")
    with pytest.raises(shares.ShareError, match="not a directory"):
        shares.mount_share(str(home), 4242, 4242, "docs")
    (home / "Redirected" / "docs").unlink()
    (home / "Redirected" / "docs").mkdir()  # root's, not the user's
    with pytest.raises(shares.ShareError, match="not the user's"):
        shares.mount_share(str(home), 4242, 4242, "docs")
    with pytest.raises(shares.ShareError):
        shares.mount_share(str(home), 4242, 4242, "..")
    assert os.getuid() == 0 and Path("/proc/self/status").read_text().count("\n") > 0  # fs ids are back to root
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    assert status["Uid"].split()[3] == "0" and status["Gid"].split()[3] == "0"


def test_a_bug_in_the_slave_command_is_a_500_not_a_silent_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """QVD's client sees why its share failed (a CI run once got a connection closed without a word)."""

    def broken(_key: str) -> None:
        raise ValueError("the agent's answer was not JSON")

    written: list[bytes] = []
    monkeypatch.setattr(nx_slave, "serve", broken)
    monkeypatch.setattr(nx_slave, "_write", written.append)
    monkeypatch.setattr(nx_slave, "read_key", lambda: "k" * 64)
    assert nx_slave.main() == 1
    assert written and written[0].startswith(b"HTTP/1.1 500 ") and b"ValueError" in written[0]
