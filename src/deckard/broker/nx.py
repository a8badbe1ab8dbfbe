"""NX for QVD's own clients: which display a connect asks for, the client's NX options, and the NX handshake.

QVD's client (``reference/qvd.md`` §8) runs ``nxproxy -S`` on the stream after the ``101`` and expects the
desktop's ``nxagent`` at the other end; Deckard's own clients (``deckard connect``, the tests) want the
desktop's VNC display and say so with the request header ``X-Deckard-Display: vnc``.  A connect without the
header is NX, so a client written against QVD's protocol alone gets what QVD would give it.

**Options.**  The client's ``qvd.client.*`` parameters become :class:`NxOptions`, every value checked against a
closed set or a strict pattern here, and checked again by the agent (``deckard-vma``), which writes them into
nxagent's options file itself: nothing the client sends reaches a shell or nxagent's command line as sent.
``qvd.client.nxagent.extra_args`` may carry only the few nxagent flags in :data:`EXTRA_ARGS`.

**Handshake.**  nxproxy speaks first: ``NXPROXY-<compat>-<version> <options> `` (two space-terminated
fields, nx-libs' ``nxcomp/src/Loop.cpp``).  nxagent checks the ``cookie=`` option of that string against
its own cookie, derived from the desktop's per-start agent token (:func:`deckard.drivers.display.nx_cookie`),
so nothing but the broker can attach to a desktop's nxagent.  :class:`NxClientHandshake` reads the client's
two fields, drops any cookie it sent and puts the desktop's in, then stays out of the way (the mirror of
the RFB handshake the broker terminates for VNC, ``tunnel.py``).
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass

from deckard.broker.tunnel import HandshakeError
from deckard.model.errors import BadInput

NX_PORT = 4100  # nxagent's port inside the desktop (QVD's: display :100 + 4000)
DISPLAY_HEADER = "x-deckard-display"
DISPLAYS = ("nx", "vnc")

LINKS = ("modem", "isdn", "adsl", "wan", "lan", "local")
# qvd.client.os → nxagent's client option: the Perl client sends linux|windows|darwin|unknown, the Qt client Qt's
# kernel type (linux, winnt, darwin, freebsd, ...); any other well-formed name is a Unix
OSES = {"windows": "windows", "winnt": "windows", "mswin32": "windows", "darwin": "macosx", "macosx": "macosx"}
OS_NAME = re.compile(r"^[a-z0-9_.-]{1,32}$")
# model/layout as QVD's clients send it (pc105/es, /us, empty/empty); nxagent's keyboard option takes model/layout
NX_KEYBOARD = re.compile(r"^(?:(?P<model>[a-z0-9_+-]{0,32})/)?(?P<layout>[a-z]{2,16})(?:\([a-z0-9_]{1,24}\))?$")
UNKNOWN_LAYOUTS = ("empty", "auto")
TIMEZONE = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]{0,30}(?:/[A-Za-z0-9_+-]{1,30}){0,2}$")
GEOMETRY = re.compile(r"^([1-9][0-9]{2,3})x([1-9][0-9]{2,3})$")
# nxagent flags a client may add (qvd.client.nxagent.extra_args): flag → pattern of its value, None if it takes none
EXTRA_ARGS: dict[str, re.Pattern[str] | None] = {
    "-dpi": re.compile(r"^[1-9][0-9]{1,2}$"),
    "-noshmem": None,
    "-noshpix": None,
    "-norender": None,
    "-nocomposite": None,
    "-r": None,
}
MAX_EXTRA_ARGS = 200
# qvd.client.* names QVD's clients send (reference/qvd.md §8); families of redirections are accepted and unused
KNOWN_PARAMS = frozenset(
    {
        "qvd.client.keyboard",
        "qvd.client.os",
        "qvd.client.link",
        "qvd.client.geometry",
        "qvd.client.fullscreen",
        "qvd.client.nxagent.extra_args",
        "qvd.client.timezone",
        "qvd.client.hostname",
        "qvd.client.type",
    }
)
KNOWN_FAMILIES = (
    "qvd.client.printing.",
    "qvd.client.usb.",
    "qvd.client.audio.",
    "qvd.client.os.",
    "qvd.client.slave.",
    "qvd.client.share.",
    "qvd.client.file_sharing.",
)
SLAVE_KEY_ALPHABET = string.ascii_letters + string.digits
MAX_COOKIE_FIELD = 512  # nxcomp's DEFAULT_REMOTE_OPTIONS_LENGTH: a longer field is not nxproxy's


def display_of(header: str | None) -> str:
    """``nx`` or ``vnc`` from the ``X-Deckard-Display`` header (absent: nx, as QVD's clients expect)."""
    value = (header or "nx").strip().lower()
    if value not in DISPLAYS:
        raise BadInput(
            f"X-Deckard-Display {value[:20]!r} is not a display protocol: use nx or vnc", code="bad_display_protocol"
        )
    return value


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "…")


@dataclass(frozen=True)
class NxOptions:
    """What the agent starts nxagent with; every field already checked."""

    geometry: str | None = None
    keyboard: str = "pc105/us"
    link: str = "adsl"
    fullscreen: bool = False
    client: str = "linux"
    timezone: str | None = None
    extra_args: tuple[str, ...] = ()
    printing: bool = False  # the client serves its printers on the slave channel (QVD's "slave4" flavour)

    def agent_params(self, slave_key: str = "", printing: bool = False) -> dict[str, str]:
        """The ``x_start`` parameters that carry these options (and the connection's slave key, and whether its
        printers become the desktop's: the client asked and the administrator allows) to the agent."""
        params = {
            "nx_keyboard": self.keyboard,
            "nx_link": self.link,
            "nx_fullscreen": "1" if self.fullscreen else "0",
            "nx_client": self.client,
        }
        if self.timezone:
            params["timezone"] = self.timezone
        if self.extra_args:
            params["nx_extra"] = " ".join(self.extra_args)
        if slave_key:
            params["nx_slave_key"] = slave_key
        if printing and self.printing:
            params["nx_printing"] = "1"
        return params


def new_slave_key() -> str:
    """A key to an NX connection's slave channel (QVD's L7R: 64 letters and digits): the client gets it in the
    ``101`` (``X-QVD-Slave-Key``), the desktop's slave command checks it (vma/nx_slave.py)."""
    return "".join(secrets.choice(SLAVE_KEY_ALPHABET) for _ in range(64))


def parse_extra_args(raw: str) -> tuple[str, ...]:
    """``qvd.client.nxagent.extra_args``: only the flags of :data:`EXTRA_ARGS`, each value checked."""
    if len(raw) > MAX_EXTRA_ARGS:
        raise BadInput(f"qvd.client.nxagent.extra_args is over {MAX_EXTRA_ARGS} characters", code="bad_nx_option")
    words = raw.split()
    out: list[str] = []
    i = 0
    while i < len(words):
        flag = words[i]
        if flag not in EXTRA_ARGS:
            allowed = ", ".join(sorted(EXTRA_ARGS))
            raise BadInput(
                f"nxagent argument {_shown(flag)} is not allowed in qvd.client.nxagent.extra_args (allowed: {allowed})",
                code="bad_nx_option",
            )
        pattern = EXTRA_ARGS[flag]
        out.append(flag)
        if pattern is not None:
            value = words[i + 1] if i + 1 < len(words) else ""
            if not pattern.match(value):
                raise BadInput(f"nxagent argument {flag} needs a value, not {_shown(value)}", code="bad_nx_option")
            out.append(value)
            i += 1
        i += 1
    return tuple(out)


def parse_nx_options(client: dict[str, str]) -> NxOptions:
    """The NX options of a connect's ``qvd.client.*`` parameters; :class:`BadInput` names the one that is wrong."""
    for key in client:
        if key.startswith("qvd.client.") and key not in KNOWN_PARAMS and not key.startswith(KNOWN_FAMILIES):
            raise BadInput(
                f"parameter {_shown(key)} is not a QVD client setting Deckard knows",
                code="unsupported_client_parameter",
            )
    geometry = client.get("qvd.client.geometry") or None
    if geometry is not None and not GEOMETRY.match(geometry):
        raise BadInput(f"qvd.client.geometry {_shown(geometry)} must look like 1024x768", code="bad_geometry")
    keyboard = "pc105/us"
    raw_kb = client.get("qvd.client.keyboard", "")
    if raw_kb:
        m = NX_KEYBOARD.match(raw_kb)
        if m is None:
            raise BadInput(
                f"qvd.client.keyboard {_shown(raw_kb)} must be an XKB layout such as pc105/us or de",
                code="bad_keyboard",
            )
        if m.group("layout") not in UNKNOWN_LAYOUTS:
            model = m.group("model")
            keyboard = f"{model if model and model not in UNKNOWN_LAYOUTS else 'pc105'}/{m.group('layout')}"
    link = client.get("qvd.client.link", "") or "adsl"
    if link not in LINKS:
        raise BadInput(f"qvd.client.link {_shown(link)} must be one of {', '.join(LINKS)}", code="bad_nx_option")
    fullscreen_raw = client.get("qvd.client.fullscreen", "")
    if fullscreen_raw not in ("", "0", "1"):
        raise BadInput(f"qvd.client.fullscreen {_shown(fullscreen_raw)} must be 0 or 1", code="bad_nx_option")
    os_raw = (client.get("qvd.client.os", "") or "linux").lower()
    if not OS_NAME.match(os_raw):
        raise BadInput(f"qvd.client.os {_shown(os_raw)} is not an operating system's name", code="bad_nx_option")
    timezone = client.get("qvd.client.timezone") or None
    if timezone is not None and (not TIMEZONE.match(timezone) or ".." in timezone):
        raise BadInput(
            f"qvd.client.timezone {_shown(timezone)} must be a zone name such as Europe/Madrid", code="bad_nx_option"
        )
    extra = parse_extra_args(client.get("qvd.client.nxagent.extra_args", ""))
    client_os = OSES.get(os_raw, "linux")
    printing = client.get("qvd.client.printing.enabled", "").lower() in ("1", "true") and client.get(
        "qvd.client.printing.flavor", "slave4"
    ) in ("", "slave4")
    return NxOptions(geometry, keyboard, link, fullscreen_raw == "1", client_os, timezone, extra, printing)


class NxHandshakeError(HandshakeError):
    """The client's first bytes are not nxproxy's version and options."""


class NxClientHandshake:
    """The client's first two fields, rewritten with the desktop's cookie (sans-IO, like ``ClientHandshake``).

    :meth:`feed` returns ``(to_client, to_desktop)``; ``to_desktop`` stays empty until both fields arrived.
    """

    def __init__(self, cookie: str) -> None:
        self._cookie = cookie
        self._buf = bytearray()
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        if self.done:
            return b"", data
        buf = self._buf
        buf += data
        if not b"NXPROXY-".startswith(bytes(buf[:8])):
            raise NxHandshakeError(f"the client does not speak NX: {bytes(buf[:12])!r}")
        first = buf.find(b" ")
        second = buf.find(b" ", first + 1) if first >= 0 else -1
        if second < 0:
            if len(buf) > 2 * MAX_COOKIE_FIELD:
                raise NxHandshakeError("the client's NX options are too long")
            return b"", b""
        version, options, rest = bytes(buf[:first]), bytes(buf[first + 1 : second]), bytes(buf[second + 1 :])
        if len(version) > 64 or len(options) > MAX_COOKIE_FIELD or not re.fullmatch(rb"NXPROXY-[0-9.\-]+", version):
            raise NxHandshakeError("the client's NX version or options are malformed")
        items = [i for i in options.split(b",") if i and not i.lower().startswith(b"cookie=")]
        self.done = True
        buf.clear()
        rewritten = b",".join([b"cookie=" + self._cookie.encode(), *items])
        return b"", version + b" " + rewritten + b" " + rest
