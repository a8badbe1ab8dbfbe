"""The guest agent's sound (``vma/sound.py``): the PulseAudio command line, the encoder worker, the framing, and the
end of a capture when its client goes away.

The encoder worker is run for real (``python3`` with the host's libopus, which the standard image has too), fed by a
tone generator in place of ``parec``; the whole path with a real PulseAudio in a real desktop and Chromium is
``tests/e2e/test_standard_peripherals.py``.
"""

# ruff: noqa: F811  (a test takes the imported ``agent_url`` fixture as a parameter)

from __future__ import annotations

import ctypes
import ctypes.util
import io
import itertools
import json
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_vma import agent_url, call  # noqa: F401  (the fixture)

from deckard.client.agent_sound import AgentSoundError, SoundRecords
from deckard.vma import sound

USER = pwd.struct_passwd(("lea", "x", 1234, 1234, "", "/home/lea", "/bin/sh"))
LIBOPUS = ctypes.util.find_library("opus")
needs_libopus = pytest.mark.skipif(
    LIBOPUS is None or not os.path.exists("/usr/bin/python3"), reason="libopus is not installed"
)
# a 440 Hz tone as raw s16le stereo at 48 kHz, in real time (one 20 ms frame every 20 ms), for `seconds`
TONE = (
    "import math, sys, time\n"
    "frame = b''.join(int(8000 * math.sin(2 * math.pi * 440 * i / 48000)).to_bytes(2, 'little', signed=True) * 2"
    " for i in range(960))\n"
    "t = time.monotonic()\n"
    "for n in range(int(float(sys.argv[1]) * 50)):\n"
    "    sys.stdout.buffer.write(frame); sys.stdout.flush()\n"
    "    time.sleep(max(0, t + (n + 1) * 0.02 - time.monotonic()))\n"
)


class Spawner:
    """The agent's ``Children`` for these tests: spawns for real, remembers what it was asked."""

    def __init__(self, replace: list[str] | None = None) -> None:
        self.calls: list[tuple[list[str], dict[str, Any]]] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.replace = replace  # run this instead (the real binary is not on the host)

    def spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        self.calls.append((args, kwargs))
        run = {k: v for k, v in kwargs.items() if k not in ("user", "group", "extra_groups")}
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.replace or args, **run)
        self.procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        pass


# -- the command lines --------------------------------------------------------------------------------------
def test_the_server_loads_a_null_sink_a_unix_socket_and_the_qvd_clients_tunnel_only_and_never_more() -> None:
    cmd = sound.pulseaudio_command(1234)
    assert cmd[0] == "/usr/bin/pulseaudio"
    assert {"--daemonize=no", "--system=no", "-n", "--exit-idle-time=-1", "--disallow-module-loading"} <= set(cmd)
    assert cmd[-1] == "--disallow-module-loading"  # after the modules: nothing can be loaded later
    modules = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-L"]
    assert [m.split()[0] for m in modules] == [
        "module-null-sink",  # first: the default sink while no QVD client is attached
        "module-native-protocol-unix",
        "module-tunnel-sink-new",
        "module-switch-on-connect",
    ]
    assert "socket=/run/user/1234/pulse/native" in modules[1]
    # the tunnel only dials nxagent's media channel on loopback; nothing listens on the network
    assert "server=tcp:127.0.0.1:7100 " in modules[2] and "reconnect_interval_ms=" in modules[2]
    rest = " ".join(m for i, m in enumerate(modules) if i != 2)
    assert not any(word in rest for word in ("tcp", "zeroconf", "rtp", "esound", "http"))
    assert sound.session_env(1234) == {
        "XDG_RUNTIME_DIR": "/run/user/1234",
        "PULSE_SERVER": "unix:/run/user/1234/pulse/native",
    }


def test_the_capture_reads_the_null_sinks_monitor_at_48_khz_stereo() -> None:
    cmd = sound.capture_command(1234)
    assert cmd[0] == "/usr/bin/parec" and "--device=deckard.monitor" in cmd and "--raw" in cmd
    assert {"--format=s16le", "--rate=48000", "--channels=2", "--server=unix:/run/user/1234/pulse/native"} <= set(cmd)


def test_the_server_runs_as_the_user_in_a_private_runtime_dir_and_is_restarted_when_it_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("chowning the runtime directory to another user needs root")
    monkeypatch.setattr(sound, "RUNTIME_ROOT", str(tmp_path / "run-user"))
    # a server that says it serves, then dies soon after, again and again
    says = "echo 'I: [pulseaudio] main.c: Daemon startup complete.' >&2; sleep 0.3"
    children = Spawner(replace=["sh", "-c", says])
    server = sound.SoundServer(children, binary=sys.executable, log_path=tmp_path / "pulseaudio.log")
    env = server.start(USER)
    try:
        assert env == sound.session_env(USER.pw_uid)
        assert server.wait_ready(5)  # from its log: the agent may not look into the user's runtime directory
        runtime = Path(env["XDG_RUNTIME_DIR"])
        st = runtime.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 1234, 0o700)
        deadline = time.monotonic() + 10
        while len(children.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(children.calls) >= 2, "the server was not started again"
        args, kwargs = children.calls[0]
        assert args == sound.pulseaudio_command(1234, sys.executable)
        assert (kwargs["user"], kwargs["group"], kwargs["extra_groups"]) == (1234, 1234, [])
        assert kwargs["env"]["HOME"] == "/home/lea" and kwargs["env"]["XDG_RUNTIME_DIR"] == str(runtime)
        assert kwargs["start_new_session"] is True
        assert b"Daemon startup complete" in (tmp_path / "pulseaudio.log").read_bytes()
    finally:
        server.stop()
    calls = len(children.calls)
    time.sleep(0.5)
    assert len(children.calls) == calls, "a stopped server was started again"
    assert not server.ready.is_set()
    assert all(p.poll() is not None for p in children.procs)


def test_a_symlink_planted_as_the_runtime_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sound, "RUNTIME_ROOT", str(tmp_path))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "1234").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError, match="not a directory"):
        sound.make_runtime_dir(USER)


# -- the framing -------------------------------------------------------------------------------------------------
def test_records_come_apart_whatever_the_chunks_and_a_bad_length_ends_the_stream() -> None:
    body = b"".join(sound.record(bytes([n]) * (n + 1), 1_000_000 + n) for n in range(5))
    for step in (1, 7, len(body)):
        records = sound.Records()
        got = [r for i in range(0, len(body), step) for r in records.feed(body[i : i + step])]
        assert got == [(bytes([n]) * (n + 1), 1_000_000 + n) for n in range(5)]
    with pytest.raises(sound.RecordError):
        sound.Records().feed(sound.RECORD.pack(sound.MAX_PACKET + 1, 0))
    with pytest.raises(sound.RecordError):
        sound.Records().feed(sound.RECORD.pack(0, 0))


def test_the_header_says_what_the_page_decodes() -> None:
    line = sound.stream_header(312)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "codec": "opus",
        "rate": 48000,
        "channels": 2,
        "frame_ms": 20,
        "bitrate": 96000,
        "pre_skip": 312,
        "clock": "realtime_us",
    }
    assert sound.BITRATE_KBPS * 1000 + 50 * 8 * (sound.RECORD.size + 8) <= 128_000  # with framing, under 128 kbit/s


def test_the_brokers_reader_takes_the_agents_body_apart_and_refuses_garbage() -> None:
    body = sound.stream_header(312) + sound.record(b"\x01\x02\x03", 42) + sound.record(b"\x04", 43)
    records = SoundRecords()
    got = [r for i in range(len(body)) for r in records.feed(body[i : i + 1])]
    assert records.header is not None and records.header["pre_skip"] == 312
    assert got == [(42, b"\x01\x02\x03"), (43, b"\x04")]
    with pytest.raises(AgentSoundError, match="bad header"):
        SoundRecords().feed(b"not json\n")
    with pytest.raises(AgentSoundError, match="no header"):
        SoundRecords().feed(b"x" * 5000)
    with pytest.raises(AgentSoundError, match="packet of 65535 bytes"):
        SoundRecords().feed(sound.stream_header(0) + sound.RECORD.pack(65535, 0))


# -- the encoder worker, for real ------------------------------------------------------------------------------
def _stream(seconds: float = 30) -> tuple[sound.SoundStream, Spawner]:
    children = Spawner()
    me = pwd.getpwuid(os.getuid())
    capture = [sys.executable, "-c", TONE, str(seconds)]
    return sound.SoundStream(children, me, capture=capture), children


def _decode(packets: list[bytes]) -> list[float]:
    """Decode with libopus; the samples of the left channel."""
    lib = ctypes.CDLL(LIBOPUS)
    lib.opus_decoder_create.restype = ctypes.c_void_p
    err = ctypes.c_int()
    dec = ctypes.c_void_p(lib.opus_decoder_create(48000, 2, ctypes.byref(err)))
    out = (ctypes.c_int16 * (960 * 2))()
    left: list[float] = []
    for packet in packets:
        n = lib.opus_decode(dec, packet, len(packet), out, 960, 0)
        assert n == 960
        left += [out[2 * i] / 32768 for i in range(n)]
    lib.opus_decoder_destroy(dec)
    return left


@needs_libopus
def test_the_encoder_sends_a_20_ms_opus_packet_as_each_frame_arrives() -> None:
    stream, children = _stream()
    try:
        got, arrived = [], []
        for packet, ts in stream.packets():
            got.append((packet, ts))
            arrived.append(time.monotonic())
            if len(got) == 50:
                break
        assert stream.pre_skip == 312  # libopus's look-ahead at 48 kHz
        assert all(0 < len(p) <= sound.MAX_PACKET for p, _ in got)
        stamps = [ts for _, ts in got]
        assert stamps == sorted(stamps) and abs(stamps[-1] - time.time_ns() // 1000) < 1_000_000
        # one packet per frame as it comes (no encoder-side buffering): 49 gaps of about 20 ms
        assert 0.7 < arrived[-1] - arrived[0] < 1.3
        bits = sum(len(p) for p, _ in got) * 8 / (len(got) * 0.02)
        assert bits <= 110_000, bits
        left = _decode([p for p, _ in got[10:]])
        crossings = sum(1 for a, b in itertools.pairwise(left) if a < 0 <= b)
        assert abs(crossings / (len(left) / 48000) - 440) < 10  # the tone, decoded
        assert max(abs(v) for v in left) > 0.1
    finally:
        stream.close()
    assert all(p.poll() is not None for p in children.procs)


@needs_libopus
def test_the_capture_ends_when_the_client_goes_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's writes fail once the broker is gone: both processes are ended and reaped, none is left."""
    server = sound.SoundServer(Spawner(), binary=sys.executable)
    server.capture = [sys.executable, "-c", TONE, "30"]
    monkeypatch.setattr(server, "check_ready", lambda _account: None)
    children = server.children
    assert isinstance(children, Spawner)

    class Gone(io.RawIOBase):
        writes = 0

        def write(self, data: Any) -> int:
            self.writes += 1
            if self.writes > 10:
                raise BrokenPipeError(32, "the broker went away")
            return len(data)

    t0 = time.monotonic()
    note = sound.serve_stream(server, pwd.getpwuid(os.getuid()), lambda: Gone(), None)  # type: ignore[arg-type,return-value]
    assert "went away" in note and time.monotonic() - t0 < 5
    assert len(children.procs) == 2 and all(p.poll() is not None for p in children.procs)
    assert server._stream is None


@needs_libopus
def test_a_new_stream_ends_the_one_before(monkeypatch: pytest.MonkeyPatch) -> None:
    server = sound.SoundServer(Spawner(), binary=sys.executable)
    server.capture = [sys.executable, "-c", TONE, "30"]
    monkeypatch.setattr(server, "check_ready", lambda _account: None)
    me = pwd.getpwuid(os.getuid())
    first = server.open_stream(me)
    second = server.open_stream(me)
    try:
        assert first.closed.is_set() and first.capture.poll() is not None and first.encoder.poll() is not None
        assert list(first.packets()) == []
        assert next(second.packets())[0]
    finally:
        server.end_stream()
    assert second.capture.poll() is not None and second.encoder.poll() is not None


def test_no_server_in_the_image_is_no_sound(tmp_path: Path) -> None:
    server = sound.SoundServer(Spawner(), binary=str(tmp_path / "no-pulseaudio"))
    assert server.start(USER) == {}
    with pytest.raises(sound.SoundError) as e:
        server.open_stream(USER)
    assert (e.value.code, e.value.status) == ("no_sound", 503)


def test_the_route_wants_the_token_and_a_desktop_user_and_says_no_sound_without_a_server(agent_url: str) -> None:
    """A real agent (``--no-init``): its ``/sound`` refuses like the file routes, then answers ``no_sound``."""
    assert call(f"{agent_url}/sound?login=lea", token=None)[0] == 401
    assert call(f"{agent_url}/sound?login=lea", token="wrong")[0] == 401
    status, body = call(f"{agent_url}/sound?login=Not+A+Login")
    assert (status, body["error"]["code"]) == (400, "bad_input")
    status, body = call(f"{agent_url}/sound?login=nobody-has-this-login")
    assert (status, body["error"]["code"]) == (409, "no_user")
    user = next((u for u in pwd.getpwall() if 1000 <= u.pw_uid <= 65533), None)
    if user is None:
        pytest.skip("no account with a desktop uid on this machine")
    status, body = call(f"{agent_url}/sound?login={user.pw_name}")
    assert (status, body["error"]["code"]) == (503, "no_sound"), body  # no sound server runs for that user
