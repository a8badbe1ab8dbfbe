"""The desktop's NX slave command (nxagent's ``NX_SLAVE_CMD``): QVD's ``qvd-vma-slaveserver``, for shared folders.

nxagent runs it as the session's user for each connection a QVD client opens on its slave channel, with the
connection as its standard input and output, no arguments, and nxagent's log as its standard error.  It reads one
request as QVD's slave server does (HTTP/1.1 head, read a byte at a time so no SFTP byte is taken by mistake) and
answers it:

- ``PUT /shares/<client path>`` with ``Upgrade: qvd:sftp/1.0[;charset=X]``: the client's folder is mounted at
  ``~/Redirected/<name>`` (the last part of its path; ``Root`` for ``/`` or ``C:\\``).  The agent makes the mount
  (``vma/shares.py``: the user cannot) and hands over its FUSE descriptor; the answer is ``101`` with
  ``X-QVD-Share-Ticket: <name>``, and this process becomes ``sshfs -o slave`` on the connection, the client side
  running ``sftp-server``.  When the client goes, nxagent ends sshfs and the agent unmounts the share.
- ``GET /shares/<desktop path>``: a folder of the desktop opened on the client; the answer is ``101`` and this
  process becomes ``sftp-server`` in that folder, the client side running sshfs.

Every request needs ``Authorization: Basic <key>``, the key the broker gave the client in the ``101`` of this
connection (``X-QVD-Slave-Key``) and the agent wrote to :data:`KEY_FILE` (QVD's VMA reads its ``slave.conf`` the
same way, but serves ``GET`` unchecked: Deckard checks every request).  Errors are QVD's: ``401`` without the
header, ``403`` for a wrong key, ``404``, ``409`` for a share name in use.

Standard library only; the image carries it as :data:`PATH` (``images/builder.py``).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from urllib.parse import unquote

PATH = "/usr/local/lib/deckard-vma/nx-slave"
KEY_FILE = "/run/deckard/nx/slave-key"
SHARES_SOCKET = "/run/deckard/shares.sock"
SSHFS = "/usr/bin/sshfs"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
MAX_HEAD = 8192
UPGRADE_RE = re.compile(r"qvd:sftp/1\.0(?:;\s*charset=([A-Za-z0-9_.:-]{1,32}))?", re.IGNORECASE)
REASONS = {
    101: "Switching Protocols",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
}


class SlaveError(Exception):
    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # percent-decoded (QVD's Qt client encodes it; its Perl client does not)
    headers: dict[str, str]  # names in lower case


def read_head(fd: int) -> bytes:
    """The request head, up to its blank line, read a byte at a time (what follows belongs to SFTP)."""
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        byte = os.read(fd, 1)
        if not byte:
            raise SlaveError(400, "the connection ended inside the request")
        head += byte
        if len(head) > MAX_HEAD:
            raise SlaveError(400, f"the request head is over {MAX_HEAD} bytes")
    return bytes(head)


def parse_head(head: bytes) -> Request:
    try:
        lines = head.decode("utf-8").split("\r\n")
    except UnicodeDecodeError:
        raise SlaveError(400, "the request is not UTF-8") from None
    # QVD's Perl client sends the path as it is, spaces included: the method is the first word, the version the last
    parts = lines[0].split(" ", 1)
    parts = [parts[0], *parts[1].rsplit(" ", 1)] if len(parts) == 2 else parts
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or not parts[0].isalpha() or not parts[1].startswith("/"):
        raise SlaveError(400, "the request line must be METHOD PATH HTTP/1.1")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise SlaveError(400, "a header line has no name")
        headers[name.strip().lower()] = value.strip()
    return Request(parts[0], unquote(parts[1]), headers)


def authorize(req: Request, key: str) -> None:
    """QVD's rule: no header is 401 (with its realm), a wrong key 403; the key is sent raw after ``Basic``."""
    given = req.headers.get("authorization", "")
    if not given.startswith("Basic "):
        raise SlaveError(401, "this request needs the slave key", (("WWW-Authenticate", 'Basic realm="QVD"'),))
    if not key or not hmac.compare_digest(given[6:].strip().encode(), key.encode()):
        raise SlaveError(403, "wrong slave key")


def share_name(client_path: str) -> str:
    """QVD's: the last part of the client's path, without trailing ``/``, ``:`` or ``\\``; ``Root`` if none."""
    path = client_path.rstrip(":/\\")
    name = re.split(r"[/\\]", path)[-1] if path else ""
    name = name.rstrip(":")
    return name if name and name not in (".", "..") else "Root"


def upgrade_charset(req: Request) -> str:
    """The charset the client's names are in (``utf-8`` unless the ``Upgrade`` says); 400 for another upgrade."""
    if "upgrade" not in req.headers.get("connection", "").lower():
        raise SlaveError(400, "a share needs Connection: Upgrade")
    match = UPGRADE_RE.fullmatch(req.headers.get("upgrade", ""))
    if match is None:
        raise SlaveError(400, "a share needs Upgrade: qvd:sftp/1.0")
    return (match.group(1) or "utf-8").lower()


def sshfs_args(fd: int, charset: str) -> list[str]:
    args = [SSHFS, "qvd-client:", f"/dev/fd/{fd}", "-o", "slave", "-o", "idmap=user"]
    if charset not in ("utf-8", "utf8"):
        args += ["-o", f"modules=iconv,from_code={charset},to_code=utf-8"]
    return args


def response(status: int, headers: tuple[tuple[str, str], ...] = (), body: str = "") -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if status != 101:
        data = body.encode()
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(data)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + data
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def mount_fd(name: str) -> int:
    """Ask the agent for the share's FUSE descriptor (vma/shares.py ``ShareServer``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        try:
            sock.connect(SHARES_SOCKET)
        except FileNotFoundError:
            raise SlaveError(501, "this desktop cannot mount shared folders (its agent has no mounter)") from None
        except OSError as exc:
            raise SlaveError(500, f"the desktop's agent did not answer ({exc.strerror or exc})") from None
        try:
            sock.sendall(json.dumps({"name": name}).encode() + b"\n")
            data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 1)
        except OSError as exc:
            raise SlaveError(500, f"the desktop's agent did not answer ({exc.strerror or exc})") from None
    answer = json.loads(data or b"{}")
    if not answer.get("ok") or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise SlaveError(int(answer.get("status", 500)), str(answer.get("message", "the share was not mounted")))
    return fds[0]


def _write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def serve(key: str) -> None:
    """Answer one request; on success this process becomes sshfs or sftp-server (and never returns)."""
    req = parse_head(read_head(0))
    authorize(req, key)
    if not req.path.startswith("/shares/"):
        raise SlaveError(404, f"nothing at {req.path[:80]}")
    target = req.path[len("/shares/") :]
    if req.method == "PUT":
        charset = upgrade_charset(req)
        name = share_name(target)
        if not os.access(SSHFS, os.X_OK):
            raise SlaveError(501, "this desktop's image has no sshfs")
        fd = mount_fd(name)
        _write(response(101, (("Connection", "Upgrade"), ("Upgrade", "qvd:sftp/1.0"), ("X-QVD-Share-Ticket", name))))
        os.set_inheritable(fd, True)
        os.execv(SSHFS, sshfs_args(fd, charset))
    if req.method == "GET":
        upgrade_charset(req)
        folder = os.path.join(os.path.expanduser("~"), target) if not target.startswith("/") else target
        if not os.path.isdir(folder):
            raise SlaveError(404, f"{target[:80]} is not a folder of the desktop")
        if not os.access(folder, os.R_OK | os.X_OK):
            raise SlaveError(403, f"{target[:80]} cannot be opened")
        if not os.access(SFTP_SERVER, os.X_OK):
            raise SlaveError(501, "this desktop's image has no sftp-server")
        os.chdir(folder)
        _write(response(101, (("Connection", "Upgrade"), ("Upgrade", "qvd:sftp/1.0"))))
        os.execv(SFTP_SERVER, [SFTP_SERVER, "-e"])
    raise SlaveError(405, f"{req.method[:10]} is not served here", (("Allow", "GET, PUT"),))


def read_key() -> str:
    try:
        with open(KEY_FILE) as f:
            return f.read().strip()
    except OSError:
        return ""  # sharing is off for this connection (or the agent is older): every request is refused


def main() -> int:
    try:
        serve(read_key())
    except OSError as exc:  # an exec that failed, a connection gone
        print(f"deckard-nx-slave: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a refusal, or a bug: the client gets a 500, not a connection closed without a word
        refusal = exc if isinstance(exc, SlaveError) else SlaveError(500, f"internal error ({type(exc).__name__})")
        print(f"deckard-nx-slave: {refusal.status} {refusal.message} ({exc!r})", file=sys.stderr)
        with contextlib.suppress(OSError):
            _write(response(refusal.status, refusal.headers, refusal.message + "\n"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
