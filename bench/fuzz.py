"""Fuzzing the broker's parsers as a benchmark (issue 8): cases run, crashes (must be 0), peak memory, seconds.

What is fuzzed, sans-IO, exactly as the broker calls it on a client's bytes:

* ``http-raw`` / ``http-shaped``: ``HttpChannel`` (h11 + the broker's head handling) fed in random pieces, then
  what the QVD routes do with each request (``Request.from_h11``, credentials, connect parameters, desktop id,
  the WebSocket handshake) and a reply, so keep-alive cycles are exercised.  ``http-shaped`` builds requests
  from QVD's paths, headers and parameter names with fuzzed values; ``http-raw`` takes bytes as they come.
* ``ws-frames`` / ``ws-raw``: ``FrameReader`` on client → broker frames (fragmented, masked, control frames in
  between, limits) split at random points.  For shaped frames the output is checked against an independent
  unmasking: the bytes relayed must be exactly the payloads sent, whatever the split.
* ``view-only``: ``ViewOnlyFilter`` (spy connections).  ``rfb-handshake``: ``tunnel.ClientHandshake`` and
  ``tunnel.DesktopHandshake`` (read-only use of ``tunnel.py``).

A case passes when it ends normally or with the module's own protocol error (``BadRequest``, ``DeckardError``,
wsproto's ``RemoteProtocolError``, ``FrameError``, the filter's ``ValueError``, ``HandshakeError``); anything
else is a crash.  Memory is bounded when every parser's buffer stays under its limit after every piece
(checked on every case) and the process's peak RSS stops growing (printed).

Engines: atheris (coverage-guided libFuzzer; ``pip install atheris``), which reaches 1,000,000 cases in
minutes on one core, or hypothesis (a dev dependency; much slower per case).  The targets are plain functions
of ``bytes``, so ``tests/unit/test_fuzz_sample.py`` runs a small hypothesis sample of the same ones.

Usage: ``.venv/bin/python bench/fuzz.py [--cases 1000000] [--engine atheris|hypothesis] [--json]``
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import h11
from wsproto.utilities import RemoteProtocolError

from deckard.broker import tunnel
from deckard.broker.auth import parse_authorization
from deckard.broker.frames import FrameError, FrameReader, unmask
from deckard.broker.http import BadRequest, FrontConnection, HttpChannel
from deckard.broker.params import parse_connect_params, parse_desktop_id
from deckard.broker.qvd import Request
from deckard.broker.websocket import ViewOnlyFilter, handshake, is_websocket
from deckard.model.errors import DeckardError

EXPECTED: tuple[type[BaseException], ...] = (
    BadRequest,
    DeckardError,
    RemoteProtocolError,
    FrameError,
    tunnel.HandshakeError,
)
MAX_HEAD = 2048  # a small head limit in the fuzzer so that "too large" paths are reached often


class Unbounded(AssertionError):
    """A parser kept more bytes than its limit allows."""


class Mismatch(AssertionError):
    """The relayed bytes differ from what the client sent."""


# ---------------------------------------------------------------- helpers


class _Sink:
    """What ``HttpChannel`` writes replies to."""

    def __init__(self) -> None:
        self.written = 0
        self.gone = False

    def write(self, data: bytes) -> None:
        self.written += len(data)


def _split(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` in random pieces (empty pieces included, as a read may bring none)."""
    if not data:
        return [b""]
    n = rng.choice((1, 1, 2, 3, 5, 8))
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(n))
    pieces, last = [], 0
    for c in [*cuts, len(data)]:
        pieces.append(data[last:c])
        last = c
    return pieces


def _rng(data: bytes) -> tuple[random.Random, bytes]:
    """A deterministic generator from the case's first bytes, and the rest."""
    return random.Random(int.from_bytes(data[:4], "little")), data[4:]


# ---------------------------------------------------------------- targets (each a function of bytes)


def _serve_requests(wire: bytes, rng: random.Random) -> None:
    channel = HttpChannel(cast(FrontConnection, _Sink()), MAX_HEAD)
    for piece in _split(wire, rng):
        channel.feed(piece)
        while True:
            event = channel.next_request()
            if len(channel._pending) > max(MAX_HEAD, len(piece)) + MAX_HEAD:
                raise Unbounded(f"HttpChannel holds {len(channel._pending)} bytes")
            if event is h11.NEED_DATA or event is None:
                break
            req = Request.from_h11(cast(h11.Request, event))
            _route(req)
            channel.respond(200, b"ok")
            if not channel.next_cycle():
                return


def _route(req: Request) -> None:
    """What the QVD routes compute from a request before any database access (each may refuse)."""
    for step in (
        lambda: parse_authorization(req.headers.get("authorization")),
        lambda: parse_desktop_id(req.query),
        lambda: parse_connect_params(req.query),
        lambda: req.header_tokens("connection") | req.header_tokens("upgrade"),
        lambda: handshake(req) if is_websocket(req) else b"",
    ):
        try:
            step()
        except (DeckardError, RemoteProtocolError):
            pass


def http_raw(data: bytes) -> None:
    rng, rest = _rng(data)
    _serve_requests(rest, rng)


PATHS = ["/qvd/ping", "/qvd/list_of_vm", "/qvd/connect_to_vm", "/qvd/stop_vm", "/ws/connect", "/", "*", "//x"]
HEADERS = ["Authorization", "Connection", "Upgrade", "Content-Length", "Host", "Transfer-Encoding", "Sec-WebSocket-Key",
           "Sec-WebSocket-Version", "Sec-WebSocket-Protocol", "Expect", "X-Y"]  # fmt: skip
VALUES = ["Basic YWxpY2U6cHc=", "Bearer eA==", "Upgrade", "QVD/1.0", "websocket", "keep-alive, Upgrade", "close",
          "13", "0", "5", "chunked", "100-continue", "dGhlIHNhbXBsZSBub25jZQ==", "binary"]  # fmt: skip
PARAMS = ["id", "ticket", "geometry", "qvd.client.geometry", "qvd.client.os", "custom.x", "vm.network"]


def _text(rng: random.Random, raw: bytes) -> str:
    """A fuzzed value: a known one, bytes of the case (any script, percent-encoded or not), or digits."""
    pick = rng.randrange(5)
    if pick == 0:
        return rng.choice(VALUES)
    if pick == 1:
        return "".join(f"%{b:02X}" for b in raw[: rng.randrange(12)])
    if pick == 2:
        return str(rng.choice((0, 1, 7, 2**63 - 1, 2**63, 10**30, -1)))
    if pick == 3:
        return raw[: rng.randrange(20)].decode("latin-1")
    return "\uff11\uff12" if rng.random() < 0.5 else "\u00b2"  # full-width 12, superscript 2


def http_shaped(data: bytes) -> None:
    rng, rest = _rng(data)
    wire = bytearray()
    for _ in range(rng.randrange(1, 4)):
        method = rng.choice(["GET", "GET", "POST", "HEAD", "PUT", "G\x00T"])
        query = "&".join(f"{rng.choice(PARAMS)}={_text(rng, rest)}" for _ in range(rng.randrange(4)))
        target = rng.choice(PATHS) + ("?" + query if query else "")
        version = rng.choice(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2", ""])
        lines = [f"{method} {target} {version}".rstrip()]
        for _ in range(rng.randrange(6)):
            lines.append(f"{rng.choice(HEADERS)}: {_text(rng, rest) if rng.random() < 0.3 else rng.choice(VALUES)}")
        if rng.random() < 0.2:
            lines.append("Authorization: Basic " + base64.b64encode(rest[:30]).decode())
        head = "\r\n".join(lines) + rng.choice(["\r\n\r\n", "\n\n", "\r\n", ""])
        wire += head.encode("latin-1", "replace")
        if rng.random() < 0.3:
            wire += rest[: rng.randrange(64)]
    _serve_requests(bytes(wire), rng)


def _frame(opcode: int, payload: bytes, fin: bool, key: bytes, length_form: int) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if length_form == 0 and n < 126:
        head = bytes((b0, 0x80 | n))
    elif length_form <= 1 and n < 65536:
        head = bytes((b0, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + key + unmask(payload, key)


def ws_frames(data: bytes) -> None:
    """Shaped frames; when the reader accepts them all, what it relays must be exactly the data payloads."""
    rng, rest = _rng(data)
    wire, expected, pos = bytearray(), bytearray(), 0
    in_message = False
    for _ in range(rng.randrange(1, 8)):
        kind = rng.randrange(10)
        size = rng.choice((0, 1, 3, 125, 126, 200, 70_000)) if rng.random() < 0.3 else rng.randrange(40)
        payload = (rest[pos : pos + size] * (size // max(1, len(rest[pos : pos + size])) + 1))[:size]
        pos += min(size, 64)
        key = rng.randbytes(4)
        if kind < 5:  # a data frame continuing or starting a message
            opcode = 0 if in_message else rng.choice((1, 2))
            fin = rng.random() < 0.6
            in_message = not fin
            expected += payload
            wire += _frame(opcode, payload, fin, key, rng.randrange(3))
        elif kind < 8:  # a ping or pong between fragments
            wire += _frame(rng.choice((9, 10)), payload[:125], True, key, 0)
        elif kind == 8:  # a frame breaking the protocol (or not)
            wire += _frame(rng.randrange(16), payload, rng.random() < 0.5, key, rng.randrange(3))
            expected = bytearray(b"\x00invalid")
        else:  # raw bytes of the case
            wire += rest[:size]
            expected = bytearray(b"\x00invalid")
    reader = FrameReader(max_message=4096)
    got = bytearray()
    for piece in _split(bytes(wire), rng):
        for event in reader.feed(piece):
            if isinstance(event, bytes):
                got += event
        if len(reader._head) > 14 or len(reader._control) > 125:
            raise Unbounded("FrameReader kept more than a header and a control frame")
    if not expected.startswith(b"\x00invalid") and got != expected:
        raise Mismatch(f"relayed {len(got)} bytes, sent {len(expected)}")


def ws_raw(data: bytes) -> None:
    rng, rest = _rng(data)
    reader = FrameReader(max_message=4096)
    for piece in _split(rest, rng):
        reader.feed(piece)
        if len(reader._head) > 14 or len(reader._control) > 125:
            raise Unbounded("FrameReader kept more than a header and a control frame")


def view_only(data: bytes) -> None:
    rng, rest = _rng(data)
    f = ViewOnlyFilter()
    wire = b"RFB 003.008\n\x01\x00" + rest if rng.random() < 0.8 else rest
    for piece in _split(wire, rng):
        try:
            f.feed(piece)
        except ValueError:  # the filter's refusal: the spy connection is closed
            return
        if len(f._buf) > ViewOnlyFilter.MAX_KEPT:
            raise Unbounded(f"ViewOnlyFilter holds {len(f._buf)} bytes")


def rfb_handshake(data: bytes) -> None:
    rng, rest = _rng(data)
    if rng.random() < 0.5:
        client = tunnel.ClientHandshake()
        wire = (b"RFB 003.008\n\x01\x01" if rng.random() < 0.5 else b"") + rest
        for piece in _split(wire, rng):
            client.feed(piece)
            if len(client._buf) > 12:
                raise Unbounded(f"ClientHandshake holds {len(client._buf)} bytes")
    else:
        desktop = tunnel.DesktopHandshake(rng.choice((None, "secret12")))
        wire = (b"RFB 003.008\n" + bytes([1, rng.choice((1, 2))]) if rng.random() < 0.5 else b"") + rest
        for piece in _split(wire, rng):
            desktop.feed(piece)
            if len(desktop._buf) > 4096 + 16:
                raise Unbounded(f"DesktopHandshake holds {len(desktop._buf)} bytes")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "http-raw": http_raw,
    "http-shaped": http_shaped,
    "ws-frames": ws_frames,
    "ws-raw": ws_raw,
    "view-only": view_only,
    "rfb-handshake": rfb_handshake,
}
NAMES = list(TARGETS)


def run_case(data: bytes) -> str:
    """One case: the first byte picks the target; returns its name.  Raises only on a crash."""
    if not data:
        return ""
    name = NAMES[data[0] % len(NAMES)]
    try:
        TARGETS[name](data[1:])
    except EXPECTED:
        pass
    return name


SEEDS = [
    b"\x00\x01\x02\x03\x04GET /qvd/ping HTTP/1.1\r\n\r\n",
    b"\x01\x00\x00\x00\x07GET /qvd/connect_to_vm?id=1&qvd.client.geometry=1024x768 HTTP/1.1\r\n"
    b"Authorization: Basic YWxpY2U6cHc=\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n",
    b"\x02\x05\x00\x00\x00" + bytes(range(256)),
    b"\x03\x00\x00\x00\x00\x82\x85abcd" + bytes(5) + b"\x89\x80abcd",
    b"\x04\x01\x00\x00\x00\x00" + bytes(19) + b"\x03" + bytes(9) + b"\x06\x00\x00\x00\x00\x00\x00\x05hello",
    b"\x05\x00\x00\x00\x00RFB 003.008\n\x01\x01\x00\x00\x00\x00",
]


# ---------------------------------------------------------------- the run


class Tally:
    def __init__(self, stop_after: int = 0, on_stop: Callable[[], None] | None = None) -> None:
        self.stop_after = stop_after  # atheris: report and end the process after this many cases
        self.on_stop = on_stop
        self.cases = 0
        self.by_target: Counter[str] = Counter()
        self.crashes: Counter[str] = Counter()
        self.examples: dict[str, bytes] = {}
        self.t0 = 0.0  # the first case (atheris first instruments every loaded module: reported apart)
        self.setup_s = 0.0
        self.rss_after_warmup = 0.0

    def run(self, data: bytes) -> None:
        if not self.cases:
            self.t0 = time.monotonic()
        self.cases += 1
        try:
            self.by_target[run_case(data)] += 1
        except Exception as e:
            frame = traceback.extract_tb(e.__traceback__)[-1]
            key = f"{type(e).__name__} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}: {str(e)[:120]}"
            self.crashes[key] += 1
            self.examples.setdefault(key, data)
        if self.cases == 20_000:
            self.rss_after_warmup = rss_peak_mb()
        if self.cases == self.stop_after and self.on_stop is not None:
            self.on_stop()

    def report(self, engine: str, as_json: bool) -> None:
        seconds = time.monotonic() - self.t0
        out: dict[str, Any] = {
            "engine": engine,
            "cases": self.cases,
            "crashes": sum(self.crashes.values()),
            "distinct_crashes": len(self.crashes),
            "seconds": round(seconds, 1),
            "setup_seconds": round(self.setup_s, 1),
            "cases_per_s": round(self.cases / seconds) if seconds else 0,
            "peak_rss_mb": round(rss_peak_mb(), 1),
            "peak_rss_after_20k_cases_mb": round(self.rss_after_warmup, 1),
            "by_target": dict(self.by_target),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        }
        if as_json:
            print(json.dumps(out))
        else:
            print(
                f"fuzz ({engine}): {out['cases']:,} cases in {out['seconds']} s ({out['cases_per_s']:,}/s),"
                f" after {out['setup_seconds']} s of set-up"
            )
            print(f"  crashes: {out['crashes']} ({out['distinct_crashes']} distinct)")
            print(f"  peak RSS {out['peak_rss_mb']} MB (after 20,000 cases: {out['peak_rss_after_20k_cases_mb']} MB)")
            print("  cases per target: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.by_target.items())))
        for key, count in self.crashes.most_common(20):
            print(f"  CRASH x{count}: {key}\n    input: {self.examples[key][:200]!r}")


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_atheris(cases: int, tally: Tally, as_json: bool) -> None:
    import atheris  # type: ignore[import-not-found]

    corpus = tempfile.mkdtemp(prefix="deckard-fuzz-")
    for i, seed in enumerate(SEEDS):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(seed)

    def stop() -> None:  # libFuzzer ends the process with C's exit(): Python's atexit would not run
        tally.report("atheris", as_json)
        sys.stdout.flush()
        os._exit(1 if tally.crashes else 0)

    tally.stop_after, tally.on_stop = cases, stop
    t0 = time.monotonic()
    atheris.instrument_all()  # coverage feedback for h11, wsproto and the broker's own parsers
    tally.setup_s = time.monotonic() - t0
    argv = [sys.argv[0], f"-runs={cases + 10_000}", "-max_len=8192", "-print_final_stats=0", corpus]
    atheris.Setup(argv, tally.run)
    atheris.Fuzz()


def run_hypothesis(cases: int, tally: Tally, as_json: bool) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.sampled_from(SEEDS), st.binary(max_size=2048)))
    def case(data: bytes) -> None:
        tally.run(data)

    case()
    tally.report("hypothesis", as_json)
    if tally.crashes:
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1_000_000)
    ap.add_argument("--engine", choices=("atheris", "hypothesis"), default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    engine = args.engine
    if engine is None:
        try:
            import atheris  # type: ignore[import-not-found]  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    tally = Tally()
    print(f"fuzzing {len(TARGETS)} targets with {engine}, {args.cases:,} cases", file=sys.stderr)
    if engine == "atheris":
        run_atheris(args.cases, tally, args.json)
    else:
        run_hypothesis(args.cases, tally, args.json)


if __name__ == "__main__":
    main()
