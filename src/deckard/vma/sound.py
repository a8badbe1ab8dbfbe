"""The desktop's sound for the browser: a PulseAudio per session and ``GET /sound``, its output as Opus.

Why PulseAudio and not PipeWire: Debian's ``pulseaudio`` runs as one plain process with no session bus, no
systemd user unit and no WirePlumber, which suits a container whose init is the agent; every application a
desktop has speaks to it (ALSA programs through ``libasound2-plugins``).

The server (:class:`SoundServer`) runs **as the desktop's user**, never as root, from the moment the display
starts: no default script (``-n``), a null sink as the only (so default) output so applications always have
one, the native protocol on a unix socket in the user's runtime directory (0700), and a tunnel sink for a QVD
client's speakers (it dials nxagent's media channel on loopback, see :data:`NX_MEDIA_PORT`) with
``module-switch-on-connect``; nothing that listens on the network, no module loading afterwards
(``--disallow-module-loading``; the tunnel's reconnects re-initialise the loaded module), ``exit-idle-time=-1``.
The session gets ``XDG_RUNTIME_DIR`` and ``PULSE_SERVER``.  It is supervised like cupsd (``agent.PdfPrinter``):
one that dies is started again, at most :data:`MAX_RESTARTS` times in a row.

``GET /sound?login=<user>`` (the agent token, as every route) captures the null sink's monitor with ``parec``
and encodes it to Opus (48 kHz stereo, :data:`BITRATE_KBPS` kbit/s VBR, 20 ms frames), both **as the user**: the
encoder is :data:`ENCODER_WORKER`, a few lines of Python run with ``python3 -I -S -c`` that call libopus (a
dependency of PulseAudio's libsndfile, so in every image that has the server) through ctypes.  Why not
``opusenc``: it writes Ogg through libopusenc, which held every packet until the input ended in Debian 12's
build whatever ``--max-delay`` and the decision-delay ctl said; the worker encodes each frame as it arrives
and needs no container to be taken apart again.  The body of the answer is:

* one JSON line, the header: ``{"codec": "opus", "rate": 48000, "channels": 2, "frame_ms": 20,
  "bitrate": 96000, "pre_skip": N, "clock": "realtime_us"}``;
* then one record per Opus packet: ``length`` (u16, big-endian: the packet's bytes), ``ts_us`` (u64,
  big-endian: CLOCK_REALTIME in microseconds when the frame's last sample reached the encoder; its first was
  captured one frame, 20 ms, and parec's fragment before), then the packet.

The worker writes the same records; the agent checks each one (the worker runs as the user, who may replace
it: a length over :data:`MAX_PACKET` ends the stream) and adds the header itself.

One stream per desktop: a new request ends the one before (the last viewer wins).  The capture ends when the
client goes away (a write fails or its socket reads EOF) or the server stops; both processes are reaped.
No server or no libopus in the image: ``503`` with code ``no_sound``.

Standard library only, like the agent, which loads this file from beside itself in an image
(``/usr/local/lib/deckard-vma/sound.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import select
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

log = logging.getLogger("deckard-vma")

PULSEAUDIO = "/usr/bin/pulseaudio"
PAREC = "/usr/bin/parec"
PYTHON = "/usr/bin/python3"
RUNTIME_ROOT = "/run/user"
SINK = "deckard"
NX_SINK = "qvd_client"
NX_MEDIA_PORT = 7100  # nxagent's media channel on display :100 (nxcomp: 7000 + the display's number)
NX_RECONNECT_MS = 1000
RATE, CHANNELS, FRAME_MS = 48000, 2, 20
BITRATE_KBPS = 96  # stereo speech and music are clear at 96; the channel stays under 128 with the framing
CAPTURE_LATENCY_MS = 10  # parec's fragment: what the server hands the capture at once
START_TIMEOUT = 10.0
MAX_RESTARTS = 5  # in a row: a server that keeps dying is left dead (and logged), the desktop carries on
STABLE_S = 60.0  # a server that ran this long before dying starts the count again
READY_LINE = b"Daemon startup complete"
MAX_LOG = 1 << 20  # bytes of the server's log kept in /run: it runs as the user, who could make it talk forever
IDLE_S = 10.0  # a capture that yields nothing for this long is broken: end the stream
MAX_PACKET = 4000  # the encoder's output buffer: an Opus packet of one 20 ms frame is at most 1275 bytes
RECORD = struct.Struct(">HQ")  # packet length, ts_us
LIBOPUS_PATHS = ("/usr/lib/x86_64-linux-gnu/libopus.so.0", "/usr/lib/aarch64-linux-gnu/libopus.so.0")


class SoundError(Exception):
    """A refusal of ``/sound`` with a stable code and its HTTP status (the agent answers it as JSON)."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class Spawner(Protocol):
    """What the agent's ``Children`` offers: spawn a process it will reap, and forget it once reaped."""

    def spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]: ...
    def forget(self, proc: subprocess.Popen[bytes]) -> None: ...


# -- the command lines --------------------------------------------------------------------------------------
def runtime_dir(uid: int) -> str:
    return f"{RUNTIME_ROOT}/{uid}"


def socket_path(uid: int) -> str:
    return f"{runtime_dir(uid)}/pulse/native"


def session_env(uid: int) -> dict[str, str]:
    """What the session's applications need to find the server."""
    return {"XDG_RUNTIME_DIR": runtime_dir(uid), "PULSE_SERVER": f"unix:{socket_path(uid)}"}


def pulseaudio_command(uid: int, binary: str = PULSEAUDIO) -> list[str]:
    """The server's command line: no default script, a null sink, the unix socket and the QVD client's tunnel;
    nothing that listens on the network."""
    return [
        binary,
        "--daemonize=no",
        "--system=no",
        "-n",  # no default.pa: only the modules below, never module-native-protocol-tcp or zeroconf
        "--exit-idle-time=-1",
        "--use-pid-file=no",
        "--realtime=no",
        "--high-priority=no",
        "--log-target=stderr",
        "--log-level=info",  # its "Daemon startup complete." line says when it serves (SoundServer._follow_log)
        "-L",
        f"module-null-sink sink_name={SINK} rate={RATE} channels={CHANNELS} sink_properties=device.description=Deckard",
        "-L",
        f"module-native-protocol-unix socket={socket_path(uid)}",
        # a QVD client's speakers: its PulseAudio through nxproxy's media channel, which nxagent offers on
        # NX_MEDIA_PORT while a client with sound is attached; tried again every second, since clients come and go
        "-L",
        f"module-tunnel-sink-new server=tcp:127.0.0.1:{NX_MEDIA_PORT} sink_name={NX_SINK}"
        f" sink_properties=device.description=QVD-client reconnect_interval_ms={NX_RECONNECT_MS}",
        "-L",
        "module-switch-on-connect",  # the client's speakers, once there, take every stream; when gone, the null sink
        "--disallow-module-loading",  # last: the modules above are loaded, nothing else ever can be
    ]


def capture_command(uid: int, binary: str = PAREC) -> list[str]:
    """Raw 16-bit PCM of the null sink's monitor (what every application plays) on stdout."""
    return [
        binary,
        f"--server=unix:{socket_path(uid)}",
        f"--device={SINK}.monitor",
        "--format=s16le",
        f"--rate={RATE}",
        f"--channels={CHANNELS}",
        f"--latency-msec={CAPTURE_LATENCY_MS}",
        "--raw",
        "--client-name=deckard-sound",
    ]


# The encoder, run as the user: PCM frames on stdin → records (length u16, ts_us u64, packet) on stdout.
ENCODER_WORKER = r"""
import ctypes
import os
import struct
import sys
import time

RATE, CHANNELS, FRAME = 48000, 2, 960
FRAME_BYTES = FRAME * CHANNELS * 2
SET_BITRATE, SET_COMPLEXITY, GET_LOOKAHEAD = 4002, 4010, 4027
APPLICATION_AUDIO = 2049

lib = ctypes.CDLL("libopus.so.0")
lib.opus_encoder_create.restype = ctypes.c_void_p
lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
lib.opus_encode.restype = ctypes.c_int32
lib.opus_encode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int32]
err = ctypes.c_int()
enc = lib.opus_encoder_create(RATE, CHANNELS, APPLICATION_AUDIO, ctypes.byref(err))
if not enc or err.value:
    sys.exit(f"opus_encoder_create failed: {err.value}")
lib.opus_encoder_ctl(ctypes.c_void_p(enc), SET_BITRATE, ctypes.c_int32(int(sys.argv[1])))
lib.opus_encoder_ctl(ctypes.c_void_p(enc), SET_COMPLEXITY, ctypes.c_int32(int(sys.argv[2])))
lookahead = ctypes.c_int32()
lib.opus_encoder_ctl(ctypes.c_void_p(enc), GET_LOOKAHEAD, ctypes.byref(lookahead))
os.write(1, struct.pack(">H", lookahead.value))
out = ctypes.create_string_buffer(4000)
pcm = bytearray()
while True:
    chunk = os.read(0, FRAME_BYTES - len(pcm))
    if not chunk:
        break
    pcm += chunk
    if len(pcm) < FRAME_BYTES:
        continue
    ts = time.time_ns() // 1000
    n = lib.opus_encode(ctypes.c_void_p(enc), bytes(pcm), FRAME, out, 4000)
    pcm.clear()
    if n < 0:
        sys.exit(f"opus_encode failed: {n}")
    os.write(1, struct.pack(">HQ", n, ts) + out.raw[:n])
"""
ENCODER_COMPLEXITY = 5  # of 10: a tenth of a core less on a 2-vCPU node, inaudible for speech and desktop sounds


def encoder_command(python: str = "/usr/bin/python3") -> list[str]:
    """The encoder worker's command line (PCM on stdin, records on stdout; first the look-ahead, u16)."""
    return [python, "-I", "-S", "-c", ENCODER_WORKER, str(BITRATE_KBPS * 1000), str(ENCODER_COMPLEXITY)]


class RecordError(Exception):
    """The encoder's output is not records as expected: end the stream."""


class Records:
    """Records (length u16, ts_us u64, packet) fed as bytes arrive → ``(packet, ts_us)``; a length over
    :data:`MAX_PACKET` raises :class:`RecordError`.  Holds at most one record's bytes."""

    def __init__(self, max_packet: int = 0) -> None:
        self.max_packet = max_packet or MAX_PACKET
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        buf = self._buf
        buf += data
        out: list[tuple[bytes, int]] = []
        pos = 0
        while len(buf) - pos >= RECORD.size:
            length, ts = RECORD.unpack_from(buf, pos)
            if not 0 < length <= self.max_packet:
                raise RecordError(f"a packet of {length} bytes")
            end = pos + RECORD.size + length
            if len(buf) < end:
                break
            out.append((bytes(buf[pos + RECORD.size : end]), ts))
            pos = end
        del buf[:pos]
        return out


def stream_header(pre_skip: int) -> bytes:
    header = {
        "codec": "opus",
        "rate": RATE,
        "channels": CHANNELS,
        "frame_ms": FRAME_MS,
        "bitrate": BITRATE_KBPS * 1000,
        "pre_skip": pre_skip,
        "clock": "realtime_us",
    }
    return json.dumps(header).encode() + b"\n"


def record(packet: bytes, ts_us: int) -> bytes:
    return RECORD.pack(len(packet), ts_us) + packet


# -- the server -------------------------------------------------------------------------------------------------
def _creds(account: pwd.struct_passwd) -> dict[str, Any]:
    if (account.pw_uid, account.pw_gid) == (os.geteuid(), os.getegid()):
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _user_env(account: pwd.struct_passwd) -> dict[str, str]:
    return {
        "HOME": account.pw_dir,
        "USER": account.pw_name,
        "LOGNAME": account.pw_name,
        "PATH": "/usr/bin:/bin",
        "LANG": "C",
        **session_env(account.pw_uid),
    }


def make_runtime_dir(account: pwd.struct_passwd) -> None:
    """``/run/user/<uid>``, 0700 and the user's, as logind would make it (made if missing, its mode set again)."""
    path = Path(runtime_dir(account.pw_uid))
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):  # a symlink planted there is not followed
        raise OSError(f"{path} is not a directory")
    if (st.st_uid, st.st_gid) != (account.pw_uid, account.pw_gid):
        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
    os.chmod(path, 0o700)


class SoundServer:
    """One PulseAudio for the desktop's session user, supervised in a background thread; and its streams."""

    def __init__(self, children: Spawner, binary: str = PULSEAUDIO, log_path: Path | None = None) -> None:
        self.children = children
        self.binary = binary
        self.log_path = log_path
        self.account: pwd.struct_passwd | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stream: SoundStream | None = None
        self.ready = threading.Event()  # the running server said "startup complete"
        self.capture: list[str] | None = None  # replaces parec's command line (tests: a tone generator)

    @property
    def installed(self) -> bool:
        return os.access(self.binary, os.X_OK)

    def start(self, account: pwd.struct_passwd) -> dict[str, str]:
        """Start supervising a server for ``account``; the environment its session needs ({} without one)."""
        self.stop()
        if not self.installed:
            return {}
        try:
            make_runtime_dir(account)
        except OSError as exc:
            log.warning("sound: no runtime directory for %s: %s", account.pw_name, exc)
            return {}
        stopping = self._stopping = threading.Event()
        self.account = account
        self._thread = threading.Thread(target=self._supervise, args=(account, stopping), daemon=True, name="sound")
        self._thread.start()
        return session_env(account.pw_uid)

    def stop(self) -> None:
        """End the stream and the server (before the session's processes are killed: no restart then)."""
        self._stopping.set()
        self.ready.clear()
        self.end_stream()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self._thread = None
        self.account = None

    def _supervise(self, account: pwd.struct_passwd, stopping: threading.Event) -> None:
        failures = 0
        while not stopping.is_set():
            t0 = time.monotonic()
            try:
                self.proc = proc = self.children.spawn(
                    pulseaudio_command(account.pw_uid, self.binary),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    cwd="/",
                    env=_user_env(account),
                    start_new_session=True,
                    **_creds(account),
                )
            except OSError as exc:
                log.warning("sound: cannot start %s: %s", self.binary, exc)
                return
            self._follow_log(proc, account, t0)
            rc = proc.wait()
            self.ready.clear()
            self.children.forget(proc)
            if stopping.is_set():
                return
            failures = 1 if time.monotonic() - t0 > STABLE_S else failures + 1
            if failures > MAX_RESTARTS:
                log.warning("sound: the server exited %d times in a row: no sound in this session", failures)
                return
            log.warning("sound: the server exited with %s; starting it again", rc)
            stopping.wait(min(2.0**failures, 30.0))

    def _follow_log(self, proc: subprocess.Popen[bytes], account: pwd.struct_passwd, t0: float) -> None:
        """Copy the server's log to ``log_path`` (at most :data:`MAX_LOG` bytes: the user runs it) until it ends;
        its "startup complete" line is the sign it serves.  The agent cannot look for the socket itself: the
        user's runtime directory is 0700, and root in a desktop has no DAC override."""
        assert proc.stderr is not None
        out = open(self.log_path, "ab") if self.log_path is not None else None  # noqa: SIM115
        written = 0
        try:
            for line in proc.stderr:
                if READY_LINE in line and not self.ready.is_set():
                    self.ready.set()
                    ms = (time.monotonic() - t0) * 1000
                    log.info("sound: server ready for %s in %.0f ms", account.pw_name, ms)
                if out is not None and written < MAX_LOG:
                    out.write(line[:1000])
                    out.flush()
                    written += len(line[:1000])
        except OSError:
            pass
        finally:
            if out is not None:
                out.close()
            proc.stderr.close()

    def wait_ready(self, timeout: float) -> bool:
        """Whether the server said it serves, within ``timeout`` seconds."""
        return self.ready.wait(timeout)

    # -- streams ------------------------------------------------------------------------------------------------
    def check_ready(self, account: pwd.struct_passwd) -> None:
        """503 ``no_sound`` unless this user's server runs (waiting a little for one that is starting)."""
        if not self.installed or not os.access(PAREC, os.X_OK) or not any(map(os.path.exists, LIBOPUS_PATHS)):
            raise SoundError("no_sound", "this desktop has no sound (its image has no audio server)", 503)
        if self.account is None or self.account.pw_uid != account.pw_uid:
            raise SoundError("no_sound", f"no sound server runs for {account.pw_name}: connect to the desktop", 503)
        if not self.wait_ready(START_TIMEOUT):
            raise SoundError("no_sound", "the desktop's sound server is not running", 503)

    def open_stream(self, account: pwd.struct_passwd) -> SoundStream:
        """A new capture for ``account``; the one before it (another viewer's) ends."""
        self.check_ready(account)
        stream = SoundStream(self.children, account, capture=self.capture)
        with self._lock:
            old, self._stream = self._stream, stream
        if old is not None:
            old.close()
        return stream

    def end_stream(self) -> None:
        with self._lock:
            old, self._stream = self._stream, None
        if old is not None:
            old.close()


class SoundStream:
    """``parec | encoder`` as the user; :meth:`packets` yields ``(packet, ts_us)`` until closed or broken.

    ``capture`` and ``encoder`` replace the command lines (tests: a tone generator instead of parec)."""

    def __init__(
        self,
        children: Spawner,
        account: pwd.struct_passwd,
        capture: list[str] | None = None,
        encoder: list[str] | None = None,
    ) -> None:
        self.children = children
        self.closed = threading.Event()
        self.pre_skip = -1  # until the encoder says its look-ahead
        read_fd, write_fd = os.pipe()
        common: dict[str, Any] = {"cwd": "/", "env": _user_env(account), "stderr": subprocess.DEVNULL}
        common.update(_creds(account))
        try:
            self.capture = children.spawn(
                capture or capture_command(account.pw_uid),
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                process_group=0,  # a group of its own, which the encoder joins
                **common,
            )
            try:
                self.encoder = children.spawn(
                    encoder or encoder_command(),
                    stdin=read_fd,
                    stdout=subprocess.PIPE,
                    bufsize=0,
                    process_group=self.capture.pid,  # one group: a signal to it reaches both
                    **common,
                )
            except OSError:
                self._end(self.capture)
                raise
        except OSError as exc:
            raise SoundError("no_sound", f"cannot start the sound capture: {exc.strerror or exc}", 503) from None
        finally:
            os.close(read_fd)
            os.close(write_fd)
        assert self.encoder.stdout is not None
        self._out = self.encoder.stdout.fileno()

    def packets(self, client: socket.socket | None = None) -> Iterator[tuple[bytes, int]]:
        """Opus packets with their time stamps; stops when closed, when the encoder ends, when nothing comes
        for :data:`IDLE_S`, or when ``client`` (the requester's socket) reads EOF.  Raises :class:`RecordError`
        on output that is not records."""
        records = Records()
        lead = b""  # the encoder's first two bytes: its look-ahead
        watched = [self._out] + ([client.fileno()] if client is not None else [])
        while not self.closed.is_set():
            ready, _, _ = select.select(watched, [], [], IDLE_S)
            if not ready:
                log.warning("sound: the capture yielded nothing for %g s", IDLE_S)
                return
            if client is not None and client.fileno() in ready and _client_gone(client):
                return
            if self._out not in ready:
                continue
            try:
                data = os.read(self._out, 65536)
            except OSError:
                return
            if not data:
                return
            if self.pre_skip < 0:
                lead += data
                if len(lead) < 2:
                    continue
                self.pre_skip, data = int.from_bytes(lead[:2], "big"), lead[2:]
            yield from records.feed(data)

    def header(self) -> bytes:
        """The header line, once the encoder has said its look-ahead (it runs then)."""
        return stream_header(self.pre_skip)

    def close(self) -> None:
        """Stop both processes and reap them (idempotent; safe from any thread)."""
        self.closed.set()
        for proc in (self.encoder, self.capture):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    proc.terminate()
        for proc in (self.encoder, self.capture):
            self._end(proc)
        if self.encoder.stdout is not None:
            with contextlib.suppress(OSError):
                self.encoder.stdout.close()

    def _end(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2.0)
        self.children.forget(proc)


def _client_gone(client: socket.socket) -> bool:
    """The requester sent EOF (or reset): a GET's client says nothing more once its request is sent."""
    try:
        return client.recv(4096, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def serve_stream(
    server: SoundServer,
    account: pwd.struct_passwd,
    start_response: Callable[[], BinaryIO],
    client: socket.socket | None,
) -> str:
    """Run one ``/sound`` request: refusals raise :class:`SoundError` before ``start_response`` (which sends the
    200 and gives the body's file); then the header and the packets until the end.  Returns a log note."""
    stream = server.open_stream(account)
    sent = packets = 0
    try:
        it = stream.packets(client)
        first = next(it, None)  # the encoder has said its look-ahead: pre_skip is known
        if first is None:
            raise SoundError("no_sound", "the sound capture ended at once", 503)
        out = start_response()
        out.write(stream.header())
        for packet, ts in _chain(first, it):
            out.write(record(packet, ts))
            out.flush()
            sent += RECORD.size + len(packet)
            packets += 1
    except OSError as exc:
        return f" {packets} packets, {sent} bytes; the client went away ({exc.__class__.__name__})"
    except RecordError as exc:
        return f" {packets} packets, {sent} bytes; the encoder broke the stream ({exc})"
    finally:
        stream.close()
        with server._lock:
            if server._stream is stream:
                server._stream = None
    return f" {packets} packets, {sent} bytes"


def _chain(first: tuple[bytes, int], rest: Iterator[tuple[bytes, int]]) -> Iterator[tuple[bytes, int]]:
    yield first
    yield from rest
