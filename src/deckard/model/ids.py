"""What a number from a client may be: ASCII digits, within the integer type of where it goes.

Why one module: Python's ``int()`` and ``str.isdigit()`` accept far more than a database can store or a person
means — full-width digits, superscript ``²`` (``isdigit()`` but not ``int()``-able), ``1_000``, surrounding
blanks and numbers of any size (SQLite then raises ``OverflowError`` deep in a query).  Every place that turns
client text into an id or an integer filter value (the API's paths, bodies and list filters, the broker's query
strings) goes through ``parse_int`` / ``parse_id`` so they all refuse the same inputs with the same message.
"""

from __future__ import annotations

import re

from deckard.model.errors import BadInput

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
# ids are the database's INTEGER: 64 bits in SQLite but 32 in PostgreSQL, where a larger value is not "no such
# row" but a bind error; the smaller range keeps both databases' answers the same (a 422, never a 500)
ID_MAX = INT32_MAX

_INTEGER = re.compile(r"-?[0-9]{1,19}")  # 19 digits: INT64_MAX's; longer never reaches int()


def parse_int(raw: str, what: str, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    """``raw`` as an integer in ``lo..hi``: ASCII digits with an optional leading ``-``, nothing else.

    ``what`` names the field in the error (``bad_input`` 422), never a column or bind-parameter name.
    """
    if not _INTEGER.fullmatch(raw):
        raise BadInput(
            f"{what} must be a whole number of ASCII digits between {lo} and {hi}, not {raw[:40]!r}",
            details={"field": what, "minimum": lo, "maximum": hi},
        )
    value = int(raw)
    if not lo <= value <= hi:
        raise BadInput(f"{what} must be between {lo} and {hi}", details={"field": what, "minimum": lo, "maximum": hi})
    return value


def parse_id(raw: str, what: str = "id") -> int:
    """An object id: ``1 .. ID_MAX``, ASCII digits only."""
    return parse_int(raw, what, 1, ID_MAX)


def looks_numeric(ref: str) -> bool:
    """Whether a reference (an id or a name) would be taken as an id by ``str.isdigit()`` in a lookup.

    ``isdigit()`` is true for full-width digits and ``²`` too: such a reference must pass ``parse_id`` or be
    refused.
    """
    return ref.isdigit()
