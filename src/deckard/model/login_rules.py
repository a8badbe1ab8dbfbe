"""Login rules: from which networks and at which hours a user may log in (Guacamole 1.6's restrictions).

A tenant sets them for all its users (``auth.rules.networks``, ``auth.rules.hours``, ``auth.rules.timezone``) and a
user may have their own (``users.allowed_networks``, ``users.allowed_hours``), which replace the tenant's.  An
empty rule allows everything.  The forms, checked when they are set so a typo never locks a tenant out silently:

- networks: CIDRs or addresses separated by commas or spaces, IPv4 or IPv6: ``10.0.0.0/8, 192.168.1.7``.
- hours: windows separated by commas, each a day or day range and a time range in the rule's time zone:
  ``Mon-Fri 07:00-19:00, Sat 09:00-13:00``; a time range that ends before it starts runs past midnight
  (``Mon-Fri 22:00-06:00``: from Monday 22:00 to Tuesday 06:00, and so on).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from deckard.model.errors import BadInput

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"(?P<d1>[a-z]{3})(?:-(?P<d2>[a-z]{3}))?\s+(?P<t1>\d{1,2}:\d{2})-(?P<t2>\d{1,2}:\d{2})")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=256)  # every login of a tenant with rules reads the same text
def parse_networks(text: str) -> tuple[Network, ...]:
    """``10.0.0.0/8, ::1`` → networks; 422 ``bad_login_rule`` naming the part that is not one."""
    nets = []
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise BadInput(
                f"{part[:50]!r} is not a network: write CIDRs such as 10.0.0.0/8", code="bad_login_rule"
            ) from None
    return tuple(nets)


def _minutes(text: str) -> int:
    hours, minutes = (int(x) for x in text.split(":"))
    if hours > 24 or minutes > 59 or (hours == 24 and minutes):
        raise ValueError(text)
    return hours * 60 + minutes


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday, as datetime.weekday()
    start: int  # minutes after midnight
    end: int  # minutes after midnight; end <= start: runs past midnight into the next day

    def contains(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        # past midnight: the evening part on the listed days, the morning part on the day after each
        return (weekday in self.days and minute >= self.start) or ((weekday - 1) % 7 in self.days and minute < self.end)


def _days(first: str, last: str | None) -> frozenset[int]:
    a = DAYS.index(first)
    b = DAYS.index(last) if last else a
    return frozenset((a + i) % 7 for i in range((b - a) % 7 + 1))


@lru_cache(maxsize=256)
def parse_hours(text: str) -> tuple[Window, ...]:
    """``Mon-Fri 07:00-19:00, Sat 09:00-13:00`` → windows; 422 ``bad_login_rule`` naming the bad part."""
    windows = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _WINDOW.fullmatch(part.lower())
        try:
            if m is None or m["d1"] not in DAYS or (m["d2"] and m["d2"] not in DAYS):
                raise ValueError(part)
            windows.append(Window(_days(m["d1"], m["d2"]), _minutes(m["t1"]), _minutes(m["t2"])))
        except ValueError:
            raise BadInput(
                f"{part[:50]!r} is not an hours window: write e.g. 'Mon-Fri 07:00-19:00, Sat 09:00-13:00'",
                code="bad_login_rule",
            ) from None
    return tuple(windows)


def parse_timezone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadInput(
            f"{name[:50]!r} is not a time zone: use an IANA name such as Europe/Madrid", code="bad_login_rule"
        ) from None


@dataclass(frozen=True)
class LoginRules:
    networks: str = ""
    hours: str = ""
    timezone: str = "UTC"

    def refusal(self, source: str, now: dt.datetime) -> tuple[str, str] | None:
        """(code, message) when a login from ``source`` at ``now`` breaks a rule; None when it may go on."""
        nets = parse_networks(self.networks)
        if nets:
            try:
                addr = ipaddress.ip_address(source)
            except ValueError:
                addr = None
            if addr is None or not any(addr in n for n in nets if n.version == addr.version):
                return "login_network_refused", "logins are not allowed from your network: ask your administrator"
        windows = parse_hours(self.hours)
        if windows:
            local = now.astimezone(parse_timezone(self.timezone))
            minute = local.hour * 60 + local.minute
            if not any(w.contains(local.weekday(), minute) for w in windows):
                return "login_hours_refused", f"logins are allowed only {self.hours} ({self.timezone})"
        return None
