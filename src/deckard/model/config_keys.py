"""Every configuration key a farm reads from the database, with its type, default and meaning.

Why a catalogue: QVD had ~330 keys in a properties file and no way to tell a typo from a key; here an unknown key
or a value of the wrong type is refused when it is set, ``deckard config get`` can show every key with its
default, and ``docs/admin-plane.md`` documents the same list.  Values are resolved in layers (built-in default →
global row → tenant row); ``per_tenant`` says whether the last layer applies to a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deckard.model.errors import BadInput


@dataclass(frozen=True)
class ConfigKey:
    name: str
    type: type  # bool | int | float | str
    default: Any
    description: str
    per_tenant: bool = False
    minimum: float | None = None


KEYS: dict[str, ConfigKey] = {
    k.name: k
    for k in (
        ConfigKey("tenancy.multi", bool, False, "Multi-tenant mode: tenants besides `default` may be created."),
        ConfigKey(
            "auth.lockout.failures", int, 5, "Failed administrator logins that lock the account and source.", minimum=1
        ),
        ConfigKey("auth.lockout.window_s", int, 600, "Seconds within which failures are counted.", minimum=1),
        ConfigKey("auth.lockout.duration_s", int, 300, "Seconds an account or source stays locked.", minimum=0),
        ConfigKey(
            "image.expire.soft_s",
            int,
            3600,
            "After publishing a new image on a tag: seconds until desktops on the old one are told to restart.",
            per_tenant=True,
            minimum=0,
        ),
        ConfigKey(
            "image.expire.hard_s",
            int,
            7200,
            "After publishing a new image on a tag: seconds until desktops on the old one are stopped.",
            per_tenant=True,
            minimum=0,
        ),
        ConfigKey(
            "desktop.start_timeout_s",
            int,
            120,
            "Seconds a desktop may take to start before it fails.",
            per_tenant=True,
            minimum=1,
        ),
        ConfigKey("ui.page_size", int, 50, "Rows per page in the web admin's lists.", per_tenant=True, minimum=1),
    )
}


def config_key(name: str) -> ConfigKey:
    try:
        return KEYS[name]
    except KeyError:
        raise BadInput(
            f"unknown config key {name!r}; known keys: {', '.join(sorted(KEYS))}", code="unknown_config_key"
        ) from None


def parse_value(key: ConfigKey, raw: Any) -> Any:
    """A value given as JSON or as CLI text, checked against the key's type (422 ``bad_config_value``)."""
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
        elif key.type is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            value = int(raw)
        elif key.type is float:
            if isinstance(raw, bool):
                raise ValueError(raw)
            value = float(raw)
        else:
            if not isinstance(raw, str):
                raise ValueError(raw)
    except (TypeError, ValueError):
        raise BadInput(f"{raw!r} is not a valid {key.type.__name__} for {key.name}", code="bad_config_value") from None
    if key.minimum is not None and isinstance(value, int | float) and value < key.minimum:
        raise BadInput(f"{key.name} must be at least {key.minimum:g}", code="bad_config_value")
    return value
