"""A QVD client's NX side for tests and benchmarks: Debian's ``nxproxy`` on an ``Xvfb``, through the broker.

It wires the programs as QVD's client does (``reference/qvd.md`` §8, ``QVD/Client/Proxy.pm``): after the
broker's ``101`` the client listens on a local port, runs ``nxproxy -S`` (the X-server side of NX) pointed at
that port, and splices the one connection nxproxy makes with the TLS stream.  nxproxy draws the desktop on the
X display it is given: here an ``Xvfb`` of the test's own, read back with ``xwd``.

Every process started here is stopped by :meth:`NxViewer.close` (and the ``async with`` around it); Xvfb
listens on its unix socket only and the splice port on loopback only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any

from deckard.client.broker import BrokerConnection
from deckard.testing import free_port

SIZE = (1024, 768)


def nx_unavailable_reason() -> str | None:
    missing = [p for p in ("nxproxy", "Xvfb", "xwd") if not shutil.which(p)]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install nxproxy xvfb x11-apps; `make test` does it)"
    return None


def xwd_pixels(display: int) -> tuple[int, int, bytes]:
    """The root window of ``:display`` as ``(width, height, 32-bit pixels)`` (Xvfb at depth 24: B, G, R, pad)."""
    raw = subprocess.run(
        ["xwd", "-root", "-silent", "-display", f":{display}"], capture_output=True, check=True, timeout=10
    ).stdout
    header_size, _, _, depth, width, height = struct.unpack_from(">6I", raw)
    ncolors = struct.unpack_from(">I", raw, 76)[0]
    pixels = raw[header_size + ncolors * 12 :]
    if depth != 24 or len(pixels) < width * height * 4:
        raise RuntimeError(f"unexpected xwd image: depth {depth}, {len(pixels)} bytes for {width}x{height}")
    return width, height, pixels


def colours(pixels: bytes, step: int = 7) -> set[bytes]:
    """The distinct colours of every ``step``-th pixel (R, G, B)."""
    return {bytes((pixels[i + 2], pixels[i + 1], pixels[i])) for i in range(0, len(pixels) - 3, 4 * step)}


def run_in_thread(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """``asyncio.run(scenario())`` on a thread of its own: Playwright's sync API holds the test thread's loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, scenario()).result()


class NxViewer:
    """One Xvfb and, per :meth:`connect`, one nxproxy spliced onto a broker connection."""

    def __init__(self, media_port: int = 0, printers: list[dict[str, Any]] | None = None) -> None:
        self.media_port = media_port  # a local PulseAudio's TCP port: the desktop's sound plays there (nxproxy media=)
        # the printers this client offers on its slave channel (QVD's client slave server: _CLIENT_SLAVE); the jobs
        # the desktop sends them land in print_dir
        self.display = 0
        self.home = Path(tempfile.mkdtemp(prefix="deckard-nx-"))
        self.xvfb: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._server: asyncio.Server | None = None
        self._broker: BrokerConnection | None = None
        # NX bytes relayed to and from the broker (the stream inside TLS), counted since the viewer was made
        self.bytes_down, self.bytes_up = [0], [0]
        # the client's end of the slave channel (shared folders): nxproxy listens there once attached, and the
        # key to it comes in the 101 (X-QVD-Slave-Key)
        self.slave_port = free_port()
        self.slave_key = ""
        self.silent_slave_closes = 0  # slave connections closed before any answer, asked again (slave_request)
        self._sftp: list[subprocess.Popen[bytes]] = []
        self.print_dir = self.home / "printed"
        self.slave_cmd: Path | None = None
        if printers is not None:
            self.print_dir.mkdir()
            self.slave_cmd = self.home / "client-slave"
            self.slave_cmd.write_text(
                _CLIENT_SLAVE.format(python=sys.executable, printers=json.dumps(printers), out=str(self.print_dir))
            )
            self.slave_cmd.chmod(0o700)

    async def __aenter__(self) -> NxViewer:
        self.start_xvfb()
        return self

    async def __aexit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    def start_xvfb(self) -> None:
        """Xvfb on a display number it picks itself (``-displayfd``): two processes choosing a free number at the
        same moment would collide, and the loser would wait on the winner's socket.  ``-noreset``: an X server
        resets when its last client leaves and refuses connections meanwhile, so an ``xwd`` right after nxproxy
        went away would fail."""
        read_fd, write_fd = os.pipe()
        with open(self.home / "xvfb.log", "wb") as log:
            self.xvfb = subprocess.Popen(
                [
                    "Xvfb",
                    "-displayfd",
                    str(write_fd),
                    "-noreset",
                    "-screen",
                    "0",
                    f"{SIZE[0]}x{SIZE[1]}x24",
                    "-nolisten",
                    "tcp",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                pass_fds=(write_fd,),
            )
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as numbers:  # Xvfb writes the number once it accepts clients
            ready, _, _ = select.select([numbers], [], [], 10)
            line = numbers.readline() if ready else b""
        if not line.strip().isdigit():
            raise RuntimeError(f"Xvfb did not start: {(self.home / 'xvfb.log').read_text()}")
        self.display = int(line)

    async def connect(
        self, server: str, ca: Path, login: str, password: str, desktop_id: int, params: dict[str, str] | None = None
    ) -> None:
        """Connect as QVD's client and hand the stream to nxproxy; returns once nxproxy is attached."""
        conn = await BrokerConnection.open(server, ca)
        try:
            reader, writer = await conn.connect(login, password, desktop_id, params=params, display="nx")
        except BaseException:
            await conn.close()
            raise
        self._broker = conn
        self.slave_key = conn.upgrade_headers.get("x-qvd-slave-key", "")
        attached: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

        def on_proxy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if attached.done():
                w.close()  # one connection per proxy, as QVD's client accepts
            else:
                attached.set_result((r, w))

        self._server = await asyncio.start_server(on_proxy, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self._start_proxy(port)
        pr, pw = await asyncio.wait_for(attached, 10)
        self._tasks = [
            asyncio.create_task(pump(pr, writer, self.bytes_up)),
            asyncio.create_task(pump(reader, pw, self.bytes_down)),
        ]

    def _start_proxy(self, port: int) -> None:
        """``nxproxy -S`` (the X-server side of NX, as QVD's client runs it) dialling ``port`` on loopback."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home), "DISPLAY": f":{self.display}"}
        if self.slave_cmd is not None:
            env["NX_SLAVE_CMD"] = str(self.slave_cmd)  # the desktop's slave connections reach it (printing)
        media = f",media={self.media_port}" if self.media_port else ""
        media += f",slave={self.slave_port}"
        with open(self.home / "nxproxy.log", "ab") as log:
            self.proxy = subprocess.Popen(
                ["nxproxy", "-S", f"nx/nx,link=lan,connect=127.0.0.1,port={port}{media}:{self.display}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def pixels(self) -> tuple[int, int, bytes]:
        return xwd_pixels(self.display)

    # -- the slave channel, as QVD's client uses it (vma/nx_slave.py is the desktop's end) -----------------------
    # Each runs in a thread: the NX stream they travel in is pumped by this loop (see :meth:`connect`).
    async def slave_request(
        self, method: str, path: str, key: str | None = None, timeout: float = 15
    ) -> tuple[int, dict[str, str], socket.socket]:
        """Send one request on a new slave connection (retried while nxproxy does not listen yet, as QVD's client
        does); returns the status, the headers and the connection, whose next byte follows the head.

        A connection closed before a single byte of answer is asked once more on a new one: twice in CI, on a
        loaded machine, the slave channel of a fresh NX session closed without a word (not reproduced in 1,000
        requests on an idle or a busy machine; the desktop's slave command answers every request it reads, so
        nxcomp's channel set-up is the suspect).  Each such retry is counted in :attr:`silent_slave_closes`."""
        for _ in range(2):
            status, headers, sock, answered = await asyncio.to_thread(self._slave_request, method, path, key, timeout)
            if answered:
                break
            sock.close()
            self.silent_slave_closes += 1
        return status, headers, sock

    def _slave_request(
        self, method: str, path: str, key: str | None, timeout: float
    ) -> tuple[int, dict[str, str], socket.socket, bool]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", self.slave_port), 2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        sock.settimeout(timeout)
        key = self.slave_key if key is None else key
        head = f"{method} {path} HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: qvd:sftp/1.0\r\n"
        head += f"Authorization: Basic {key}\r\n\r\n" if key else "\r\n"
        sock.sendall(head.encode())
        raw = b""
        while not raw.endswith(b"\r\n\r\n"):  # a byte at a time: SFTP follows at once
            byte = sock.recv(1)
            if not byte:
                break
            raw += byte
        lines = raw.decode(errors="replace").split("\r\n")
        status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/1.1 ") else 0
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        return status, headers, sock, bool(raw)

    async def share(
        self, folder: Path, key: str | None = None
    ) -> tuple[int, dict[str, str], subprocess.Popen[bytes] | None]:
        """Share ``folder`` into the desktop (``PUT /shares/<folder>``): on ``101`` this side serves it with
        ``sftp-server``, as QVD's client does; returns the status, the headers and that server."""
        status, headers, sock = await self.slave_request("PUT", f"/shares/{folder}", key)
        if status != 101:
            sock.close()
            return status, headers, None
        return status, headers, self._serve_share(sock, folder)

    def _serve_share(self, sock: socket.socket, folder: Path) -> subprocess.Popen[bytes]:
        with sock:
            sock.settimeout(None)
            server = subprocess.Popen(
                [SFTP_SERVER, "-e"], cwd=folder, stdin=sock.fileno(), stdout=sock.fileno(), stderr=subprocess.DEVNULL
            )
        self._sftp.append(server)
        return server

    async def fetch_from_desktop(self, folder: str, name: str, target: Path) -> subprocess.CompletedProcess[str]:
        """Copy ``name`` from the desktop's ``folder`` (``GET /shares/<folder>``) with OpenSSH's ``sftp``, its
        transport a relay that opens the slave connection first (QVD's client mounts it with sshfs instead)."""
        relay = self.home / "slave-relay"
        relay.write_text(_RELAY.format(python=sys.executable, port=self.slave_port, key=self.slave_key, path=folder))
        relay.chmod(0o700)
        return await asyncio.to_thread(
            subprocess.run,
            ["sftp", "-q", "-b", "-", "-D", str(relay)],
            input=f"get {name} {target}\n",
            capture_output=True,
            text=True,
            timeout=30,
        )

    async def wait_drawn(self, colour: bytes, timeout: float = 20) -> float:
        """Seconds until ``colour`` (R, G, B) shows on the Xvfb, polled every 50 ms; raises on timeout."""
        t0 = time.monotonic()
        seen = "no image"
        while True:
            try:
                _, _, px = await asyncio.to_thread(self.pixels)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:  # keep polling: the deadline says
                seen = f"xwd failed: {e}"
            else:
                if colour in colours(px, 3):
                    return time.monotonic() - t0
                seen = f"colours {len(colours(px))}"
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{colour.hex()} not drawn within {timeout:g} s; {seen}")
            await asyncio.sleep(0.05)

    def log(self) -> str:
        path = self.home / "nxproxy.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    async def disconnect(self) -> None:
        """The client goes away: nxproxy ends and the broker connection closes."""
        if self.proxy is not None:
            _stop(self.proxy)
            self.proxy = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._broker is not None:
            await self._broker.close()
            self._broker = None

    async def close(self) -> None:
        for server in self._sftp:
            _stop(server)
        await self.disconnect()
        if self.xvfb is not None:
            _stop(self.xvfb)
            self.xvfb = None
        shutil.rmtree(self.home, ignore_errors=True)


SFTP_SERVER = "/usr/lib/openssh/sftp-server"
# sftp -D's "server": open a slave connection, ask for the desktop's folder, then relay the SFTP bytes
_RELAY = """#!{python}
import os, select, socket, sys
sock = socket.create_connection(("127.0.0.1", {port}), 10)
sock.sendall(b"GET /shares/{path} HTTP/1.1\\r\\nConnection: Upgrade\\r\\nUpgrade: qvd:sftp/1.0\\r\\n"
             b"Authorization: Basic {key}\\r\\n\\r\\n")
head = b""
while not head.endswith(b"\\r\\n\\r\\n"):
    byte = sock.recv(1)
    if not byte:
        sys.exit("the desktop closed the slave connection")
    head += byte
if not head.startswith(b"HTTP/1.1 101"):
    sys.exit(head.decode(errors="replace"))
while True:
    ready, _, _ = select.select([0, sock], [], [])
    if 0 in ready:
        data = os.read(0, 65536)
        if not data:
            sock.shutdown(socket.SHUT_WR)
        else:
            sock.sendall(data)
    if sock in ready:
        data = sock.recv(65536)
        if not data:
            break
        os.write(1, data)
"""


# QVD's client slave server (qvd-client-slaveserver), its printing part: nxproxy runs it for each connection the
# desktop opens on the slave channel, the connection on its standard input and output
_CLIENT_SLAVE = """#!{python}
import json, os, sys, time
PRINTERS = json.loads({printers!r})
OUT = {out!r}
head = b""
while not head.endswith(b"\\r\\n\\r\\n"):
    byte = os.read(0, 1)
    if not byte:
        sys.exit(0)
    head += byte
lines = head.decode("latin-1").split("\\r\\n")
method, path = lines[0].split(" ")[:2]
headers = {{k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}}
def send(status, reason, body=b"", kind="text/plain"):
    os.write(1, f"HTTP/1.1 {{status}} {{reason}}\\r\\nContent-Type: {{kind}}\\r\\n"
                f"Content-Length: {{len(body)}}\\r\\n\\r\\n".encode() + body)
ids = [p["qvd_id"] for p in PRINTERS]
if method == "GET" and path == "/printer":
    send(200, "OK", json.dumps({{"Printers": PRINTERS}}).encode(), "application/json")
elif method == "POST" and path.startswith("/printer/") and path.endswith("/printjob") and path.split("/")[2] in ids:
    size, data = int(headers["content-length"]), b""
    while len(data) < size:
        chunk = os.read(0, size - len(data))
        if not chunk:
            sys.exit(1)
        data += chunk
    os.write(1, b"HTTP/1.1 102 Processing\\r\\nX-QVD-SlaveServer-Info: Document is being queued\\r\\n\\r\\n")
    name = os.path.join(OUT, f"{{path.split('/')[2]}}-{{time.time_ns()}}")
    with open(name + ".part", "wb") as f:
        f.write(data)
    os.rename(name + ".part", name + ".pdf")
    send(200, "OK", path.split("/")[2].encode())
else:
    send(404, "Not Found")
"""


async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: list[int]) -> None:
    """Copy ``src`` to ``dst`` until either ends, adding the bytes to ``count[0]``; then close ``dst``."""
    try:
        while data := await src.read(65536):
            count[0] += len(data)
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            dst.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class ClientSound:
    """The client's speakers, as QVD's client has them: a PulseAudio of its own with a null sink and the native
    protocol on a loopback TCP port (nxproxy's ``media=`` forwards the desktop's sound there), recorded from the
    sink's monitor.  Root may run it (``--system=no``); it lives in a temporary directory, stopped by :meth:`close`."""

    RATE = 48000

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="deckard-pa-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ClientSound:
        with socket.socket() as s:  # a free port (the server binds it a moment later)
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**self._env(), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        with open(self.home / "pulseaudio.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "pulseaudio",
                    "--daemonize=no",
                    "--system=no",
                    "-n",
                    "--exit-idle-time=-1",
                    "--use-pid-file=no",
                    "--log-target=stderr",
                    "-L",
                    f"module-null-sink sink_name=speakers rate={self.RATE} channels=2",
                    "-L",
                    f"module-native-protocol-unix socket={self.home / 'native'}",
                    "-L",
                    f"module-native-protocol-tcp port={self.port} listen=127.0.0.1 auth-anonymous=1",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 10
        while not (self.home / "native").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pulseaudio did not start: {(self.home / 'pulseaudio.log').read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def _env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "XDG_RUNTIME_DIR": str(self.home), "PULSE_SERVER": f"unix:{self.home}/native"}

    def record(self, seconds: float) -> list[int]:
        """``seconds`` of what the speakers play, mono 16-bit samples at RATE."""
        args = ["parec", "-d", "speakers.monitor", "--raw", "--format=s16le", f"--rate={self.RATE}", "--channels=1"]
        proc = subprocess.Popen(args, env={**os.environ, **self._env()}, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        want = int(seconds * self.RATE) * 2
        data = b""
        deadline = time.monotonic() + seconds + 10
        while len(data) < want and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            data += chunk
        proc.kill()
        proc.wait()
        n = len(data) // 2
        return list(struct.unpack(f"<{n}h", data[: n * 2]))

    def close(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None
        shutil.rmtree(self.home, ignore_errors=True)


def dominant_frequency(samples: list[int], rate: int, low: int = 100, high: int = 2000, step: int = 10) -> float:
    """The frequency (Hz, to ``step``) with the most energy between ``low`` and ``high`` (Goertzel on every 6th
    sample: a pure tone below 4 kHz survives the decimation); 0.0 for silence."""
    x = samples[::6]
    fs = rate / 6
    best, best_power = 0.0, 0.0
    for f in range(low, high + 1, step):
        coeff = 2 * math.cos(2 * math.pi * f / fs)
        s1 = s2 = 0.0
        for v in x:
            s1, s2 = v + coeff * s1 - s2, s1
        power = s1 * s1 + s2 * s2 - coeff * s1 * s2
        if power > best_power:
            best, best_power = float(f), power
    return best if best_power > 0 and max((abs(v) for v in x), default=0) > 300 else 0.0
