"""Query parameters of ``connect_to_vm`` and ``stop_vm``, checked the way QVD's L7R checks them.

QVD accepts ``id`` plus parameters named ``qvd.client.*`` (the client's settings: geometry, keyboard, ...)
and ``custom.*``; anything else is refused with 403 so a client cannot smuggle settings that only an
administrator may set.  A missing ``id`` is 422.  ``qvd.client.geometry`` sizes the display and
``qvd.client.keyboard`` (QVD's ``pc105/us`` or a bare XKB layout such as ``de`` or ``fr(azerty)``) sets the
session's keyboard layout; the rest is kept for the logs.  A connect for NX (``nx.py``: QVD's clients) has its
options parsed into :class:`~deckard.broker.nx.NxOptions`, which refuses what nxagent could not be given.

Ids are checked by ``model/ids.py``, as the API checks them: ASCII digits within the database's INTEGER
(``str.isdigit`` would let ``²`` and full-width digits through, and a larger number is a bind error on
PostgreSQL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from deckard.broker.nx import NxOptions, parse_nx_options
from deckard.model.errors import BadInput, PermissionDenied
from deckard.model.ids import ID_MAX, parse_id

ALLOWED_PARAM = re.compile(r"^(qvd\.client\.|custom\.)")
GEOMETRY = re.compile(r"^[1-9][0-9]{1,4}x[1-9][0-9]{1,4}$")
# QVD's clients send "<model>/<layout>" (pc105/es; the Qt client "/us" when X names no model, "empty/empty" when
# it cannot tell); the layout part is an XKB layout with an optional variant
KEYBOARD = re.compile(r"^(?:[a-z0-9_+-]{0,32}/)?(?P<layout>[a-z]{2,16}(?:\([a-z0-9_]{1,24}\))?)$")
# what the agents of every image built so far apply with setxkbmap (a longer layout is left to nxagent's option)
SESSION_LAYOUT = re.compile(r"^[a-z]{2,3}(?:\([a-z0-9_]{1,24}\))?$")


@dataclass(frozen=True)
class ConnectParams:
    desktop_id: int
    client: dict[str, str] = field(default_factory=dict)  # every qvd.client.* and custom.* pair, as sent
    display: str = "vnc"  # nx | vnc: the display protocol the client speaks after the 101
    nx: NxOptions | None = None  # set when display is nx

    @property
    def geometry(self) -> str | None:
        return self.client.get("qvd.client.geometry") or None

    @property
    def keyboard(self) -> str | None:
        """The XKB layout for the session (``us``, ``fr(azerty)``), from QVD's ``pc105/us`` form too."""
        m = KEYBOARD.match(self.client.get("qvd.client.keyboard", ""))
        return m.group("layout") if m and SESSION_LAYOUT.match(m.group("layout")) else None


def parse_desktop_id(pairs: list[tuple[str, str]]) -> int:
    """The ``id`` parameter: 422 when missing or not a positive integer."""
    values = [v for k, v in pairs if k == "id"]
    if not values or not values[0].strip(" \t"):
        raise BadInput("the request has no desktop id: add ?id=N (see list_of_vm)", code="missing_id")
    if len(values) > 1:
        raise BadInput("the desktop id is given more than once", code="bad_id")
    raw = values[0].strip(" \t")
    try:
        return parse_id(raw, "the desktop id")
    except BadInput:
        shown = raw if len(raw) <= 40 else raw[:40] + "…"
        raise BadInput(f"the desktop id {shown!r} is not ASCII digits between 1 and {ID_MAX}", code="bad_id") from None


def parse_connect_params(pairs: list[tuple[str, str]], display: str = "vnc") -> ConnectParams:
    """Check the query of a connect (order as QVD: id 422 first, then unknown names 403, then values)."""
    desktop_id = parse_desktop_id(pairs)
    client: dict[str, str] = {}
    for key, value in pairs:
        if key == "id":
            continue
        if not ALLOWED_PARAM.match(key):
            raise PermissionDenied(
                f"parameter {key!r} is not allowed: only id, qvd.client.* and custom.* may be sent",
                code="forbidden_parameter",
            )
        client[key] = value
    geometry = client.get("qvd.client.geometry")
    if geometry and not GEOMETRY.match(geometry):
        raise BadInput(f"qvd.client.geometry {geometry!r} must look like 1024x768", code="bad_geometry")
    keyboard = client.get("qvd.client.keyboard")
    if keyboard and not KEYBOARD.match(keyboard):
        shown = keyboard if len(keyboard) <= 40 else keyboard[:40] + "…"
        raise BadInput(
            f"qvd.client.keyboard {shown!r} must be an XKB layout such as us, de or fr(azerty) (or pc105/us)",
            code="bad_keyboard",
        )
    nx = parse_nx_options(client) if display == "nx" else None
    return ConnectParams(desktop_id, client, display, nx)
