"""Shared folders in a desktop: a QVD client's folder mounted at ``~/Redirected/<name>`` (docs/clients.md).

QVD's client shares a folder over the NX slave channel: the desktop's slave command (``vma/nx_slave.py``, run by
nxagent as the user) answers ``PUT /shares/<path>`` and runs ``sshfs -o slave`` on the channel, while the client
runs ``sftp-server``.  sshfs needs a FUSE mount, and mounting needs ``CAP_SYS_ADMIN``, which root in a desktop
must not have: a mount is how a process hides files from others or unmasks what the desktop's /proc hides.

So one process alone can mount, and it does nothing else:

- the **mounter** (:class:`Mounter`), forked by the agent at boot before any thread, keeps ``CAP_SYS_ADMIN`` (in
  the desktop's own user namespace: the host sees an unprivileged uid).  It answers the agent alone, over a
  socket pair, and only two requests: mount a FUSE file system at ``~<user>/Redirected/<name>`` (returning the
  ``/dev/fuse`` descriptor) and unmount it.  Each path is walked from the user's home one directory at a time
  without following links, and the mount is made on the descriptor (``/proc/self/fd/N``), so a link the user
  planted cannot turn it elsewhere;
- the **agent** then drops ``CAP_SYS_ADMIN`` (and ``CAP_SETPCAP``, which dropping it from the bounding set
  takes) from its own sets (:func:`drop_mount_privileges`): every process started afterwards, root ones
  included, lacks it, and none of them can ptrace the mounter (the kernel refuses to trace a process holding
  capabilities the tracer lacks without ``CAP_SYS_PTRACE``, which no desktop has);
- the **share server** (:class:`ShareServer`, a thread of the agent) listens on :data:`SOCKET_PATH` for the
  session user's slave command (checked by ``SO_PEERCRED``), asks the mounter for the mount and passes the FUSE
  descriptor on (``SCM_RIGHTS``).  The slave command then runs sshfs on ``/dev/fd/N`` (libfuse's pre-mounted
  descriptor).  When that process ends (the client went: nxcomp ends its slave processes) the server unmounts
  the share and removes its directory, as QVD's VMA does on suspend.

Standard library only: the image carries this file beside the agent (``drivers/agent_code.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import socket
import struct
import threading
import time
from typing import Any, NamedTuple

log = logging.getLogger("deckard-vma")

SOCKET_PATH = "/run/deckard/shares.sock"
REDIRECTED = "Redirected"  # QVD's ``vma.user.shares.path``: ~/Redirected
FUSE_DEVICE = "/dev/fuse"
MAX_SHARES = 16  # per session: each is a FUSE connection and a process
MAX_REQUEST = 4096
MAX_CLIENTS = 8  # slave commands asking at once (each has 5 s): more wait in the socket's backlog
NAME_RE = re.compile(r"[^/\x00]{1,255}")
CAP_SETPCAP, CAP_SYS_ADMIN = 8, 21
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8
PR_CAPBSET_DROP, PR_SET_DUMPABLE = 24, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
WATCH_S = 0.5  # how often the server looks for shares whose sshfs ended


class ShareError(Exception):
    """A refusal with the HTTP status the slave command answers the client with."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def valid_name(name: str) -> bool:
    return bool(NAME_RE.fullmatch(name)) and name not in (".", "..")


# ---- the privileged half ------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def _fail(what: str) -> ShareError:
    err = ctypes.get_errno()
    return ShareError("share_failed", f"{what}: {os.strerror(err)}", 500)


@contextlib.contextmanager
def _as_user(uid: int, gid: int) -> Any:
    """File access as the user (root in a desktop may not enter their home: it has no DAC override); what is
    made is theirs.  The mount's own privilege is a capability, which the file ids do not touch."""
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    try:
        yield
    finally:
        _libc.setfsuid(0)
        _libc.setfsgid(0)


def _open_dir(name: str, dir_fd: int | None, uid: int, create: bool) -> int:
    """``name`` in ``dir_fd`` as a directory descriptor, never through a link; made if ``create``; refused
    unless the user owns it."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        raise ShareError("share_refused", f"{name} is not a directory of the user's ({exc.strerror})", 409) from None
    if os.fstat(fd).st_uid != uid:
        os.close(fd)
        raise ShareError("share_refused", f"{name} is not the user's", 409)
    return fd


def _redirected(home: str, uid: int, create: bool) -> int:
    home_fd = _open_dir(home, None, uid, create=False)
    try:
        return _open_dir(REDIRECTED, home_fd, uid, create)
    finally:
        os.close(home_fd)


def mount_share(home: str, uid: int, gid: int, name: str) -> int:
    """A FUSE mount at ``<home>/Redirected/<name>`` that only ``uid`` may enter; returns its /dev/fuse descriptor."""
    if not valid_name(name):
        raise ShareError("bad_share", "a share's name must be a file name")
    with _as_user(uid, gid):
        return _mount_share(home, uid, gid, name)


def _mount_share(home: str, uid: int, gid: int, name: str) -> int:
    red = _redirected(home, uid, create=True)
    try:
        share = _open_dir(name, red, uid, create=True)
    finally:
        os.close(red)
    try:
        if os.listdir(share):
            raise ShareError("share_exists", f"~/{REDIRECTED}/{name} is in use: it is not empty", 409)
        fuse = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={fuse},rootmode=40000,user_id={uid},group_id={gid}"
        if (
            _libc.mount(
                b"deckard-share",
                f"/proc/self/fd/{share}".encode(),
                b"fuse.sshfs",
                MS_NOSUID | MS_NODEV,
                options.encode(),
            )
            != 0
        ):
            error = _fail("mount")
            os.close(fuse)
            raise error
        return fuse
    finally:
        os.close(share)


def unmount_share(home: str, uid: int, gid: int, name: str) -> None:
    """Detach the share at ``<home>/Redirected/<name>`` (if mounted) and remove its directory (if empty)."""
    if not valid_name(name):
        return
    with _as_user(uid, gid):
        _unmount_share(home, uid, name)


def _unmount_share(home: str, uid: int, name: str) -> None:
    try:
        red = _redirected(home, uid, create=False)
    except (ShareError, OSError):
        return
    try:
        # the last step is not followed either: a link put there since is not unmounted through
        _libc.umount2(f"/proc/self/fd/{red}/{name}".encode(), MNT_DETACH | UMOUNT_NOFOLLOW)
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=red)
    finally:
        os.close(red)


def _serve(sock: socket.socket) -> None:
    """The mounter's loop: one request, one answer, until the agent closes its end."""
    while True:
        try:
            data = sock.recv(MAX_REQUEST)
        except OSError:
            return
        if not data:
            return
        fds: list[int] = []
        try:
            req = json.loads(data)
            home, uid, gid, name = str(req["home"]), int(req["uid"]), int(req["gid"]), str(req["name"])
            if uid <= 0 or gid <= 0:
                raise ShareError("bad_share", "shares are mounted for a user, never for root")
            if req["op"] == "mount":
                fds = [mount_share(home, uid, gid, name)]
            elif req["op"] == "unmount":
                unmount_share(home, uid, gid, name)
            else:
                raise ShareError("bad_share", "unknown request")
            answer: dict[str, Any] = {"ok": True}
        except ShareError as exc:
            answer = {"ok": False, "code": exc.code, "message": exc.message, "status": exc.status}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            answer = {"ok": False, "code": "share_failed", "message": str(exc), "status": 500}
        try:
            socket.send_fds(sock, [json.dumps(answer).encode()], fds)
        except OSError:
            return
        finally:
            for fd in fds:
                os.close(fd)


class Mounter:
    """The agent's end of the mounter: requests go one at a time.  (No dataclasses in the agent's modules: with
    ``inspect`` they cost ~10 ms of the agent's start, which a desktop's start waits for.)"""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.lock = threading.Lock()

    @classmethod
    def fork(cls) -> Mounter:
        """Fork the mounter (before any thread: a fork copies only the calling one)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the mounter
            try:
                ours.close()
                _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no core, no /proc/<pid>/mem for its own uid either
                _serve(theirs)
            finally:
                os._exit(0)
        theirs.close()
        return cls(ours, pid)

    def _ask(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self.lock:
            self.sock.sendall(json.dumps(request).encode())
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_REQUEST, 1)
        if not data:
            raise ShareError("share_failed", "the mounter is gone", 500)
        answer: dict[str, Any] = json.loads(data)
        if not answer.get("ok"):
            for fd in fds:
                os.close(fd)
            raise ShareError(answer["code"], answer["message"], int(answer.get("status", 500)))
        return answer, fds

    def mount(self, home: str, uid: int, gid: int, name: str) -> int:
        _, fds = self._ask({"op": "mount", "home": home, "uid": uid, "gid": gid, "name": name})
        if len(fds) != 1:
            raise ShareError("share_failed", "the mounter sent no FUSE descriptor", 500)
        return fds[0]

    def unmount(self, home: str, uid: int, gid: int, name: str) -> None:
        self._ask({"op": "unmount", "home": home, "uid": uid, "gid": gid, "name": name})


def drop_mount_privileges() -> bool:
    """Drop ``CAP_SYS_ADMIN``, then ``CAP_SETPCAP`` (needed to drop the first from the bounding set), from this
    thread's bounding, permitted, effective and inheritable sets.  Call it before any thread starts:
    capabilities are per thread, and threads and children inherit them; with the desktop's ``no_new_privs`` not
    even root's execve gets them back.  False if any step failed."""
    for cap in (CAP_SYS_ADMIN, CAP_SETPCAP):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            return False
    header = struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    data = ctypes.create_string_buffer(24)  # two {effective, permitted, inheritable} words
    if _libc.capget(header, data) != 0:
        return False
    words = list(struct.unpack("6I", data.raw))
    for i in range(3):  # the first word of each set holds capabilities 0-31
        words[i] &= ~((1 << CAP_SYS_ADMIN) | (1 << CAP_SETPCAP))
    return bool(_libc.capset(header, struct.pack("6I", *words)) == 0)


def has_sys_admin() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    return False


# ---- the agent's half: the socket the slave command asks ----------------------------------------------------
class Share(NamedTuple):
    name: str
    pid: int  # the slave command that asked; it becomes sshfs (exec), whose end is the share's end
    home: str
    uid: int
    gid: int


class ShareServer:
    """Serves :data:`SOCKET_PATH` to the session's user: ``{"name": N}`` → a FUSE descriptor mounted at
    ``~/Redirected/N``.  ``user()`` says whose session it is now: (login, uid, gid, home) or None."""

    def __init__(self, mounter: Mounter, user: Any, path: str = SOCKET_PATH) -> None:
        self.mounter = mounter
        self.user = user
        self.path = path
        self.shares: dict[str, Share] = {}
        self.lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        os.chmod(self.path, 0o666)  # whoever connects is checked by SO_PEERCRED
        sock.listen(8)
        self._sock = sock
        threading.Thread(target=self._accept, daemon=True, name="shares").start()
        threading.Thread(target=self._watch, daemon=True, name="shares-watch").start()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            self._clients.acquire()
            try:
                conn, _ = self._sock.accept()
            except OSError:
                self._clients.release()
                return
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        with conn, _released(self._clients):
            conn.settimeout(5)
            try:
                pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                line = conn.makefile("rb").readline(MAX_REQUEST)
                name = str(json.loads(line)["name"])
                fd = self.open_share(pid, uid, name)
            except ShareError as exc:
                answer = {"ok": False, "code": exc.code, "message": exc.message, "status": exc.status}
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                return
            except (OSError, ValueError, KeyError, TypeError) as exc:
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"ok": False, "code": "bad_share", "message": str(exc)}).encode() + b"\n")
                return
            try:
                socket.send_fds(conn, [b'{"ok": true}\n'], [fd])
            except OSError:
                self.close_share(name)
            finally:
                os.close(fd)

    def open_share(self, pid: int, uid: int, name: str) -> int:
        """Mount ``name`` for the session user asking as ``pid``; returns the FUSE descriptor."""
        user = self.user()
        if user is None or uid != user[1]:
            raise ShareError("forbidden", "only the desktop's session user shares folders into it", 403)
        if not valid_name(name):
            raise ShareError("bad_share", "a share's name must be a file name")
        _login, uid, gid, home = user
        with self.lock:
            old = self.shares.get(name)
            if old is not None and _alive(old.pid):
                raise ShareError("share_exists", f"a share named {name} is mounted already", 409)
            if old is not None:  # its sshfs ended and the watcher has not been by yet
                self._unmount(old)
            if len(self.shares) >= MAX_SHARES:
                raise ShareError("too_many_shares", f"at most {MAX_SHARES} shared folders at a time", 429)
            fd = self.mounter.mount(home, uid, gid, name)
            self.shares[name] = Share(name, pid, home, uid, gid)
        log.info("shared folder %s mounted at ~/%s/%s", name, REDIRECTED, name)
        return fd

    def close_share(self, name: str) -> None:
        with self.lock:
            share = self.shares.get(name)
            if share is not None:
                self._unmount(share)

    def close_all(self) -> None:
        """The session ended or was suspended: every share goes."""
        with self.lock:
            for share in list(self.shares.values()):
                self._unmount(share)

    def _unmount(self, share: Share) -> None:
        self.shares.pop(share.name, None)
        try:
            self.mounter.unmount(share.home, share.uid, share.gid, share.name)
            log.info("shared folder %s unmounted", share.name)
        except (ShareError, OSError) as exc:
            log.warning("shared folder %s not unmounted: %s", share.name, exc)

    def _watch(self) -> None:
        while True:
            time.sleep(WATCH_S)
            with self.lock:
                for share in [s for s in self.shares.values() if not _alive(s.pid)]:
                    self._unmount(share)


@contextlib.contextmanager
def _released(semaphore: threading.BoundedSemaphore) -> Any:
    try:
        yield
    finally:
        semaphore.release()


def _alive(pid: int) -> bool:
    """The process runs (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False
