"""A few seconds of ``bench/fuzz.py`` in every test run: the same targets, a small hypothesis sample.

The benchmark runs a million cases with atheris; here each target gets a couple of hundred hypothesis cases
plus the seed inputs, which is enough to catch a parser change that crashes on the first odd input.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deckard.broker.websocket import handshake
from deckard.model.errors import BadInput


def _load_fuzz() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("deckard_bench_fuzz", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()


@pytest.mark.parametrize("name", sorted(fuzz.TARGETS))
def test_each_target_survives_a_hypothesis_sample(name: str) -> None:
    target = fuzz.TARGETS[name]

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=1024))
    def case(data: bytes) -> None:
        try:
            target(data)
        except fuzz.EXPECTED:
            pass

    case()


def test_seeds_and_a_random_sample_run_without_a_crash_and_reach_every_target() -> None:
    tally = fuzz.Tally()
    rng = random.Random(8)
    for seed in fuzz.SEEDS:
        tally.run(seed)
    for i in range(3000):
        tally.run(bytes([i % len(fuzz.NAMES)]) + rng.randbytes(rng.randrange(1, 400)))
    assert not tally.crashes, tally.crashes
    assert set(tally.by_target) == set(fuzz.TARGETS)


def test_the_harness_reports_a_crash_it_is_not_blind() -> None:
    """A target that breaks its contract is counted as a crash, not swallowed as a protocol error."""
    tally = fuzz.Tally()
    original = fuzz.TARGETS["ws-raw"]

    def broken(_data: bytes) -> None:
        raise KeyError("bug")

    fuzz.TARGETS["ws-raw"] = broken
    try:
        tally.run(bytes([fuzz.NAMES.index("ws-raw")]) + b"xxxx")
    finally:
        fuzz.TARGETS["ws-raw"] = original
    assert sum(tally.crashes.values()) == 1


def test_a_head_request_gets_its_reply_without_a_body() -> None:
    """The crash the fuzzer found: h11 refuses a body after HEAD, and the broker used to drop the connection."""
    fuzz.http_raw(b"\x00\x00\x00\x00HEAD /qvd/ping HTTP/1.1\r\n\r\nHEAD /nothing HTTP/1.1\r\n\r\n")


@pytest.mark.parametrize("header", [b"Host: \xc2\xb2", b"Sec-WebSocket-Protocol: \xb2"])
def test_a_websocket_upgrade_with_non_ascii_headers_is_refused_not_a_crash(header: bytes) -> None:
    """Found by the fuzzer: wsproto decodes these as ASCII/IDNA and raised UnicodeDecodeError."""
    head = (
        b"GET /ws/connect?ticket=x HTTP/1.1\r\n" + header + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    fuzz.http_raw(b"\x00\x00\x00\x00" + head)
    channel = fuzz.HttpChannel(fuzz._Sink(), 4096)
    channel.feed(head)
    req = fuzz.Request.from_h11(channel.next_request())
    with pytest.raises(BadInput):
        handshake(req)
