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
import contextlib
import os
import select
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from deckard.client.broker import BrokerConnection

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


class NxViewer:
    """One Xvfb and, per :meth:`connect`, one nxproxy spliced onto a broker connection."""

    def __init__(self) -> None:
        self.display = 0
        self.home = Path(tempfile.mkdtemp(prefix="deckard-nx-"))
        self.xvfb: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._server: asyncio.Server | None = None
        self._broker: BrokerConnection | None = None

    async def __aenter__(self) -> NxViewer:
        self.start_xvfb()
        return self

    async def __aexit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    def start_xvfb(self) -> None:
        """Xvfb on a display number it picks itself (``-displayfd``): two processes choosing a free number at the
        same moment would collide, and the loser would wait on the winner's socket."""
        read_fd, write_fd = os.pipe()
        with open(self.home / "xvfb.log", "wb") as log:
            self.xvfb = subprocess.Popen(
                ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{SIZE[0]}x{SIZE[1]}x24", "-nolisten", "tcp"],
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
            asyncio.create_task(_pump(pr, writer)),
            asyncio.create_task(_pump(reader, pw)),
        ]

    def _start_proxy(self, port: int) -> None:
        """``nxproxy -S`` (the X-server side of NX, as QVD's client runs it) dialling ``port`` on loopback."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home), "DISPLAY": f":{self.display}"}
        with open(self.home / "nxproxy.log", "ab") as log:
            self.proxy = subprocess.Popen(
                ["nxproxy", "-S", f"nx/nx,link=lan,connect=127.0.0.1,port={port}:{self.display}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def pixels(self) -> tuple[int, int, bytes]:
        return xwd_pixels(self.display)

    async def wait_drawn(self, colour: bytes, timeout: float = 20) -> float:
        """Seconds until ``colour`` (R, G, B) shows on the Xvfb, polled every 50 ms; raises on timeout."""
        t0 = time.monotonic()
        while True:
            _, _, px = await asyncio.to_thread(self.pixels)
            if colour in colours(px, 3):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{colour.hex()} not drawn within {timeout:g} s; colours {len(colours(px))}")
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
        await self.disconnect()
        if self.xvfb is not None:
            _stop(self.xvfb)
            self.xvfb = None
        shutil.rmtree(self.home, ignore_errors=True)


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
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
