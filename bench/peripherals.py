"""The browser desktop's peripherals (issue 14): file upload and download through the broker, against the raw path.

A real all-in-one farm (``deckard.testing.FarmProcess``) with one LXC desktop.  The client speaks the portal's
file panel protocol (``broker/files.py``) over ``wss://broker/ws/files`` with a files ticket from the portal
API, exactly as the page does: an upload of ``--mib`` MiB in 256 KiB binary frames into ``~/Uploads``, then its
download back (bytes compared).  Two references, measured in the same run on the same desktop:

* the broker's raw tunnel: the desktop's display through the broker's WebSocket (the page's path), with Xvnc
  sending full-screen updates in Raw encoding as fast as they are asked for (nothing to compress);
* the desktop network itself: the same amount of bytes over plain TCP between this host and a listener inside
  the desktop (no TLS, no broker, no disk) — the ceiling.

Target (issue 14): upload and download at ≥ 50 % of the broker's tunnel.

Sound (a second desktop, of the standard image: built from the image cache as the e2e tests build it): Chromium
opens the portal's viewer, whose page plays the desktop's sound (``web/src/_sound.js``).  Inside the desktop a
script keeps ``pacat`` fed in real time and, every ``--gap`` seconds, hands it a 10 ms click, writing down the wall
clock at that moment; the page notes when a sound starting after silence will be heard (``deckardSound.onsets``:
the decoded frame's play-out time, after the jitter buffer, plus the output's own latency).  The container shares
the host's clock, so each click's latency desktop → page is the difference; target p50 ≤ 200 ms.  Then 10 s of a
stereo speech-like signal (a voice-like harmonic series with formants and syllables) gives the channel's bandwidth
as the page receives it (Opus packets and their 8-byte time stamps; WebSocket and TLS framing add about 1 kbit/s),
target ≤ 128 kbit/s.

Usage: ``.venv/bin/python bench/peripherals.py [--mib 200] [--runs 3] [--clicks 30] [--no-files] [--no-sound]
[--json]`` (root; LXC; Chromium for the sound part).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from typing import Any

import httpx
import websockets

from _rfb import RawViewer, WsBytes  # bench/_rfb.py
from deckard.runtime.tls import client_context
from deckard.testing import CHROMIUM, CHROMIUM_ARGS, FarmProcess, goto, image_cache

PASSWORD = "bench-pass1"
SLICE = 256 * 1024
PORT = 5599  # the raw listener inside the desktop

# inside the desktop (as root): serve N bytes to one connection ("send"), or read N bytes from one ("recv")
RAW_SERVER = r"""
import socket, sys
mode, n, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", port)); s.listen(1)
c, _ = s.accept()
buf = b"\0" * (1 << 20)
left = n
while left > 0:
    if mode == "send":
        left -= c.send(buf[: min(left, len(buf))])
    else:
        data = c.recv(1 << 20)
        if not data:
            break
        left -= len(data)
c.close()
"""


def raw_path(farm: FarmProcess, desktop_id: int, ip: str, size: int, mode: str) -> float:
    """MB/s of ``size`` bytes over plain TCP between this host and the desktop (``send``: desktop → host)."""
    farm.attach(desktop_id, f"cat > /tmp/raw.py <<'EOF'\n{RAW_SERVER}\nEOF")
    lxc, name = farm.guest_of(desktop_id)
    server = subprocess.Popen(
        [
            "lxc-attach",
            "-n",
            name,
            "-P",
            str(lxc),
            "--clear-env",
            "--",
            "python3",
            "/tmp/raw.py",
            mode,
            str(size),
            str(PORT),
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                sock = socket.create_connection((ip, PORT), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        t0 = time.perf_counter()
        left = size
        chunk = b"\0" * (1 << 20)
        with sock:
            while left > 0:
                if mode == "send":
                    data = sock.recv(1 << 20)
                    if not data:
                        break
                    left -= len(data)
                else:
                    left -= sock.send(chunk[: min(left, len(chunk))])
            if mode == "recv":
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)  # the desktop closes once it read everything
        return size / (time.perf_counter() - t0) / 1e6
    finally:
        server.wait(30)


class Panel:
    """The portal's file panel, spoken by a script."""

    def __init__(self, farm: FarmProcess, desktop_id: int) -> None:
        self.farm, self.desktop_id = farm, desktop_id
        self.api = f"https://127.0.0.1:{farm.api_port}"
        self.ctx = client_context(farm.home / "tls" / "ca.pem")
        self.token = ""

    async def login(self) -> None:
        async with httpx.AsyncClient(verify=self.ctx) as http:
            resp = await http.post(f"{self.api}/portal/login", json={"login": "bench", "password": PASSWORD})
            self.token = resp.raise_for_status().json()["token"]

    async def ticket(self, purpose: str) -> str:
        async with httpx.AsyncClient(verify=self.ctx) as http:
            resp = await http.post(
                f"{self.api}/portal/desktops/{self.desktop_id}/ticket",
                json={"purpose": purpose},
                headers={"Authorization": f"Bearer {self.token}"},
            )
            return str(resp.raise_for_status().json()["broker_ws_url"])

    async def start_desktop(self) -> None:
        """Connect once (what the portal's Connect does) so the desktop runs with its user's session."""
        async with websockets.connect(await self.ticket("connect"), ssl=self.ctx, max_size=None) as ws:
            while isinstance(await asyncio.wait_for(ws.recv(), 120), str):
                pass  # progress lines until the display's first bytes

    async def tunnel_mb_s(self, seconds: float = 3.0) -> float:
        """MB/s of the desktop's display through the broker's WebSocket tunnel: the page's path, fed as fast as Xvnc
        sends full-screen updates in Raw encoding (4 bytes a pixel, nothing to compress), three requests in
        flight."""
        async with websockets.connect(await self.ticket("connect"), ssl=self.ctx, max_size=None) as ws:
            rfb = WsBytes(ws)
            viewer = RawViewer(rfb.read, rfb.send, rfb.skip)
            await viewer.handshake()
            got, took = await viewer.stream(seconds)
            return got / took / 1e6

    async def transfer(self, data: bytes) -> tuple[float, float]:
        """(upload MB/s, download MB/s) of ``data`` through the panel; the bytes must come back the same."""
        async with websockets.connect(await self.ticket("files"), ssl=self.ctx, max_size=None) as ws:
            assert "ready" in json.loads(await ws.recv())
            name = f"bench-{time.time_ns()}.bin"
            t0 = time.perf_counter()
            await ws.send(json.dumps({"op": "upload", "name": name, "size": len(data)}))
            assert json.loads(await ws.recv()).get("accepted")
            for i in range(0, len(data), SLICE):
                await ws.send(data[i : i + SLICE])
            while "done" not in (msg := json.loads(await ws.recv())):
                assert "progress" in msg, msg
            upload = len(data) / (time.perf_counter() - t0) / 1e6
            t0 = time.perf_counter()
            await ws.send(json.dumps({"op": "download", "path": msg["done"]["path"]}))
            assert "file" in json.loads(await ws.recv())
            chunks, got = [], 0
            while got < len(data):
                chunk = await ws.recv()
                assert isinstance(chunk, bytes)
                chunks.append(chunk)  # compared after the clock stops, as the page keeps them (a Blob)
                got += len(chunk)
            assert "done" in json.loads(await ws.recv())
            download = len(data) / (time.perf_counter() - t0) / 1e6
            assert b"".join(chunks) == data, "the download differs from the upload"
            self.farm.attach(self.desktop_id, f"rm -f '/home/bench/{msg['done']['path']}'")
            return upload, download


async def measure(farm: FarmProcess, desktop_id: int, mib: int, runs: int) -> dict[str, Any]:
    panel = Panel(farm, desktop_id)
    await panel.login()
    await panel.start_desktop()
    ip = str(farm.desktop("bench-desk")["ip"])
    data = os.urandom(mib << 20)
    rows = []
    for _ in range(runs):
        tunnel = await panel.tunnel_mb_s()
        up, down = await panel.transfer(data)
        raw_up = await asyncio.to_thread(raw_path, farm, desktop_id, ip, len(data), "recv")
        raw_down = await asyncio.to_thread(raw_path, farm, desktop_id, ip, len(data), "send")
        rows.append({"upload": up, "download": down, "tunnel": tunnel, "raw_up": raw_up, "raw_down": raw_down})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {
        "mib": mib,
        "runs": runs,
        "upload_mb_s": round(med["upload"], 1),
        "download_mb_s": round(med["download"], 1),
        "broker_tunnel_mb_s": round(med["tunnel"], 1),
        "upload_vs_tunnel": round(med["upload"] / med["tunnel"], 2),
        "download_vs_tunnel": round(med["download"] / med["tunnel"], 2),
        "raw_to_desktop_mb_s": round(med["raw_up"], 1),
        "raw_from_desktop_mb_s": round(med["raw_down"], 1),
        "upload_ratio": round(med["upload"] / med["raw_up"], 2),
        "download_ratio": round(med["download"] / med["raw_down"], 2),
    }


# inside the desktop, as the user: a 10 ms click handed to pacat every GAP seconds (nothing in between: a stream that
# is fed silence from before pacat connected would carry that backlog as delay); prints the clicks' wall-clock
# times (ms), one a line
CLICKS = r"""
import math, struct, subprocess, sys, time
n, gap = int(sys.argv[1]), float(sys.argv[2])
cmd = ["pacat", "--raw", "--format=s16le", "--rate=48000", "--channels=2", "--latency-msec=10"]
p = subprocess.Popen(cmd, stdin=subprocess.PIPE)
chunk = 480  # 10 ms
click = b"".join(struct.pack("<hh", v, v) for v in (int(24000 * math.sin(2 * math.pi * 1000 * i / 48000))
                                                    for i in range(chunk)))
time.sleep(1.0)  # pacat connects
times = []
for _ in range(n):
    times.append(time.time() * 1000)
    p.stdin.write(click + bytes(chunk * 4))
    p.stdin.flush()
    time.sleep(gap)
p.stdin.close()
p.wait()
print("\n".join(f"{t:.1f}" for t in times))
"""

# inside the desktop, as the user: SECONDS of a stereo speech-like signal played with pacat
SPEECH = r"""
import math, random, struct, subprocess, sys
seconds, rate, block = float(sys.argv[1]), 48000, 960
random.seed(7)
formants = ((700, 130), (1220, 70), (2600, 160))
out = bytearray()
phase = 0.0
for b in range(int(seconds * rate) // block):
    t = b * block / rate
    f0 = 130 + 30 * math.sin(2 * math.pi * 0.7 * t)  # intonation, constant over a 20 ms block
    amps = [sum(math.exp(-((h * f0 - f) / w) ** 2) for f, w in formants) / h for h in range(1, 17)]
    syllable = max(0.0, math.sin(2 * math.pi * 3.5 * t)) ** 0.7  # 3.5 syllables a second, pauses between
    for _ in range(block):
        phase += 2 * math.pi * f0 / rate
        voice = sum(a * math.sin(h * phase) for h, a in enumerate(amps, 1))
        left = 9000 * syllable * voice + 1500 * random.uniform(-1, 1) * (1 - syllable)
        left = int(max(-32767, min(32767, left)))
        out += struct.pack("<hh", left, int(0.8 * left))
subprocess.run(["pacat", "--raw", "--format=s16le", "--rate=48000", "--channels=2"], input=bytes(out), check=True)
"""
PULSE = "PULSE_SERVER=unix:/run/user/$(id -u)/pulse/native"


def standard_image() -> str:
    """The standard profile's image, from the image cache (what tests/e2e/conftest.py's fixture builds)."""
    from deckard.images.builder import build_image
    from deckard.images.profile import load_profile

    path = asyncio.run(
        build_image(
            image_cache() / "built",
            cache_dir=image_cache(),
            progress=lambda _t, _f: None,
            profile=load_profile("standard"),
        )
    )
    return str(path)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure_sound(farm: FarmProcess, desktop_id: int, clicks: int, gap: float) -> dict[str, Any]:
    """Click latency desktop → page and the channel's bandwidth for speech, in Chromium (module docstring)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            page.set_default_timeout(120_000)
            goto(page, f"https://127.0.0.1:{farm.api_port}/")
            page.get_by_label("User name").fill("bench")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.get_by_role("button", name="Connect to bench-sound").click()
            page.wait_for_function("() => document.body.dataset.firstFrame")
            page.wait_for_function("() => window.deckardSound.decoded > 50")
            scripts = f"cat > /tmp/clicks.py <<'EOF'\n{CLICKS}\nEOF\ncat > /tmp/speech.py <<'EOF'\n{SPEECH}\nEOF"
            assert farm.attach(desktop_id, scripts).returncode == 0  # the desktop runs now
            page.evaluate("window.deckardSound.onsets = []")
            out = farm.attach(desktop_id, f"{PULSE} python3 /tmp/clicks.py {clicks} {gap}", user="bench")
            assert out.returncode == 0, out
            sent = [float(line) for line in out.stdout.split()]
            page.wait_for_timeout(1000)
            heard = page.evaluate("window.deckardSound.onsets")
            lat = []
            for t in sent:
                after = [h - t for h in heard if 0 <= h - t < gap * 1000]
                if after:
                    lat.append(min(after))
            page_stats = page.evaluate(
                "({buffer: window.deckardSound.bufferMs, age: window.deckardSound.ageMs,"
                " output: window.deckardSound.outputMs, dropped: window.deckardSound.dropped})"
            )
            before = page.evaluate("({b: window.deckardSound.bytes, p: window.deckardSound.packets})")
            t0 = time.monotonic()
            speech = farm.attach(desktop_id, f"{PULSE} python3 /tmp/speech.py 10", user="bench")
            assert speech.returncode == 0, speech
            after_ = page.evaluate("({b: window.deckardSound.bytes, p: window.deckardSound.packets})")
            elapsed = (after_["p"] - before["p"]) * 0.02  # packets are 20 ms of sound each
            kbit = (after_["b"] - before["b"]) * 8 / elapsed / 1000
            wall = time.monotonic() - t0
        finally:
            browser.close()
    return {
        "clicks": len(sent),
        "clicks_heard": len(lat),
        "latency_p50_ms": round(statistics.median(lat), 1) if lat else None,
        "latency_p95_ms": round(percentile(lat, 95), 1) if lat else None,
        "latency_min_ms": round(min(lat), 1) if lat else None,
        "latency_max_ms": round(max(lat), 1) if lat else None,
        "page_buffer_ms": page_stats["buffer"],
        "capture_to_page_ms": page_stats["age"],
        "page_output_ms": page_stats["output"],
        "page_dropped": page_stats["dropped"],
        "speech_kbit_s": round(kbit, 1),
        "speech_seconds": round(elapsed, 1),
        "speech_wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clicks", type=int, default=30)
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between two clicks")
    ap.add_argument("--no-files", action="store_true")
    ap.add_argument("--no-sound", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    image = None if args.no_sound else standard_image()
    farm = FarmProcess()
    out: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()} cpus={os.cpu_count()}"}
    try:
        farm.up()
        farm.deckard("user", "add", "bench", "--password", PASSWORD)
        if not args.no_files:
            farm.deckard("desktop", "add", "bench-desk", "--user", "bench")
            desk = farm.desktop("bench-desk")
            out["files"] = asyncio.run(measure(farm, int(desk["id"]), args.mib, args.runs))
            farm.deckard("desktop", "stop", "bench-desk", "--wait", "60", check=False)
        if image is not None:
            farm.deckard("image", "import", image, "--tag", "standard")
            farm.deckard("desktop", "add", "bench-sound", "--user", "bench", "--tag", "standard")
            desk = farm.desktop("bench-sound")
            out["sound"] = measure_sound(farm, int(desk["id"]), args.clicks, args.gap)
    finally:
        farm.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(out["machine"])
    if "sound" in out:
        s = out["sound"]
        print(
            f"  sound: {s['clicks_heard']}/{s['clicks']} clicks heard; latency desktop -> page p50 "
            f"{s['latency_p50_ms']} ms, p95 {s['latency_p95_ms']} ms (min {s['latency_min_ms']}, max "
            f"{s['latency_max_ms']})"
        )
        print(
            f"  sound: last packet capture -> page {s['capture_to_page_ms']} ms, page jitter buffer "
            f"{s['page_buffer_ms']} ms, audio output {s['page_output_ms']} ms, dropped {s['page_dropped']} frames"
        )
        print(f"  sound: speech-like stereo {s['speech_kbit_s']} kbit/s over {s['speech_seconds']} s")
    if "files" not in out:
        return
    f = out["files"]
    print(f"{out['machine']}: {f['mib']} MiB, median of {f['runs']}")
    print(f"  broker tunnel (display, Raw updates over wss) {f['broker_tunnel_mb_s']:7.1f} MB/s")
    print(f"  upload / tunnel {f['upload_vs_tunnel']:.2f}x, download / tunnel {f['download_vs_tunnel']:.2f}x")
    for what, mine, raw, ratio in (
        ("upload", "upload_mb_s", "raw_to_desktop_mb_s", "upload_ratio"),
        ("download", "download_mb_s", "raw_from_desktop_mb_s", "download_ratio"),
    ):
        print(f"  {what:8} {f[mine]:7.1f} MB/s   raw path {f[raw]:7.1f} MB/s   {f[ratio]:.2f}x")


if __name__ == "__main__":
    main()
