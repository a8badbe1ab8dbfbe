"""Every configuration key a farm reads from the database, with its type, default and meaning.

Why a catalogue: QVD had ~330 keys in a properties file and no way to tell a typo from a key; here an unknown key
or a value of the wrong type is refused when it is set, ``deckard config get`` can show every key with its
default, and ``docs/admin-plane.md`` documents the same list.  Values are resolved in layers (built-in default →
global row → tenant row); ``per_tenant`` says whether the last layer applies to a key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from deckard.model.errors import BadInput, pick
from deckard.model.ids import parse_int
from deckard.model.placement import PLACERS

_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")


@dataclass(frozen=True)
class ConfigKey:
    name: str
    type: type  # bool | int | float | str
    default: Any
    description: str
    per_tenant: bool = False
    minimum: float | None = None
    maximum: float | None = None  # numeric keys have both bounds (tests/unit/test_model.py checks it)
    pattern: str | None = None  # text keys: the whole value must match (the description names the forms)


KEYS: dict[str, ConfigKey] = {
    k.name: k
    for k in (
        ConfigKey("tenancy.multi", bool, False, "Multi-tenant mode: tenants besides `default` may be created."),
        ConfigKey(
            "auth.lockout.failures",
            int,
            5,
            "Failed administrator logins from one address to one account before each try waits 2, 4, 8 … seconds.",
            minimum=1,
            maximum=1000,
        ),
        ConfigKey(
            "auth.lockout.source_failures",
            int,
            100,
            "Failed administrator logins from one address, to any accounts, before that address is slowed down.",
            minimum=1,
            maximum=1_000_000,
        ),
        ConfigKey(
            "auth.lockout.window_s",
            int,
            600,
            "Seconds after the last wait until failures are forgotten.",
            minimum=1,
            maximum=7 * 86400,
        ),
        ConfigKey(
            "auth.lockout.max_delay_s",
            int,
            900,
            "Longest wait between two login tries (seconds).",
            minimum=1,
            maximum=86400,
        ),
        ConfigKey(
            "image.max_upload_mib",
            int,
            16384,
            "Largest disk image a tenant may upload (MiB); set per tenant by the farm's administrators.",
            per_tenant=True,
            minimum=1,
            maximum=1 << 20,
        ),
        ConfigKey(
            "users.home_on_delete",
            str,
            "archive",
            "What deleting a user does with their home: `archive` (moved to storage/homes-archive) or `delete`.",
            per_tenant=True,
            pattern="archive|delete",
        ),
        ConfigKey(
            "image.expire.soft_s",
            int,
            3600,
            "After publishing a new image on a tag: seconds until desktops on the old one are told to restart.",
            per_tenant=True,
            minimum=0,
            maximum=10 * 365 * 86400,
        ),
        ConfigKey(
            "image.expire.hard_s",
            int,
            7200,
            "After publishing a new image on a tag: seconds until desktops on the old one are stopped.",
            per_tenant=True,
            minimum=0,
            maximum=10 * 365 * 86400,
        ),
        ConfigKey(
            "desktop.start_timeout_s",
            int,
            120,
            "Seconds a desktop may take to start before it fails.",
            per_tenant=True,
            minimum=1,
            maximum=3600,
        ),
        ConfigKey(
            "placement.placer",
            str,
            "qvd",
            "How a node is chosen for a desktop: `qvd` (QVD's weighted score), `fewest` (fewest desktops) or "
            "`binpack` (fill a node before the next).",
            pattern="|".join(PLACERS),
        ),
        ConfigKey(
            "placement.reserve",
            str,
            "largest",
            "Memory kept free for the desktops of a failed node: `largest` (the largest node's share), `none`, or a "
            "fraction of one node's memory such as `0.25`.",
            pattern=r"largest|none|0(\.[0-9]+)?|1(\.0+)?",
        ),
        ConfigKey(
            "ui.page_size", int, 50, "Rows per page in the web admin's lists.", per_tenant=True, minimum=1, maximum=1000
        ),
    )
}


def config_key(name: str) -> ConfigKey:
    return pick(KEYS, name, "config key", "unknown_config_key")


def _number(key: ConfigKey, raw: Any) -> int | float:
    """``raw`` (a JSON number or ASCII text) as the key's number type; ``ValueError`` if it is not one."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValueError(raw)
    if isinstance(raw, str):
        text = raw.strip()
        if key.type is int:
            return parse_int(text, key.name)  # ASCII digits only: no full-width digits, no "1_000"
        if not _DECIMAL.fullmatch(text):
            raise ValueError(raw)
        raw = float(text)
    if isinstance(raw, float) and (not math.isfinite(raw) or (key.type is int and not raw.is_integer())):
        raise ValueError(raw)
    return int(raw) if key.type is int else float(raw)


def parse_value(key: ConfigKey, raw: Any) -> Any:
    """A value given as JSON or as CLI text, checked against the key's type and bounds (422
    ``bad_config_value``, naming the key and the allowed range)."""
    value: Any = raw
    try:
        if key.type is bool:
            if isinstance(raw, str):
                low = raw.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                value = low in ("1", "true", "yes", "on")
            elif not isinstance(raw, bool):
                raise ValueError(raw)
        elif key.type in (int, float):
            value = _number(key, raw)
        elif not isinstance(raw, str) or (key.pattern and not re.fullmatch(key.pattern, raw)):
            raise ValueError(raw)
    except (TypeError, ValueError, BadInput):
        raise BadInput(
            f"{str(raw)[:40]!r} is not a valid {key.type.__name__} for {key.name}{_range_text(key)}",
            code="bad_config_value",
            details=_range_details(key),
        ) from None
    lo = -math.inf if key.minimum is None else key.minimum
    hi = math.inf if key.maximum is None else key.maximum
    if key.type in (int, float) and not lo <= value <= hi:
        raise BadInput(
            f"{key.name} must be{_range_text(key)}, not {value}", code="bad_config_value", details=_range_details(key)
        )
    return value


def _range_text(key: ConfigKey) -> str:
    if key.pattern is not None:
        return f" ({key.description})"
    if key.minimum is not None and key.maximum is not None:
        return f" between {key.minimum:g} and {key.maximum:g}"
    if key.minimum is not None:
        return f" at least {key.minimum:g}"
    if key.maximum is not None:
        return f" at most {key.maximum:g}"
    return ""


def _range_details(key: ConfigKey) -> dict[str, Any]:
    bounds = {"minimum": key.minimum, "maximum": key.maximum, "pattern": key.pattern}
    return {"key": key.name, **{k: v for k, v in bounds.items() if v is not None}}
