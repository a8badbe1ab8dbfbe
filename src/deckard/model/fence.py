"""A node's fence agent, as the database keeps it so that *another* node can fence this one when it is lost.

QVD's Luna "performs fencing on Sparkle's behalf": the node that declares a peer lost must be able to power that
peer's machine off, so the way to do it cannot live in the lost node's own settings (it is gone) nor in each
monitor's (they do not know every machine's BMC).  It lives in the peer's row: an agent of the ClusterLabs
*fence agent API* (``fence_ipmilan``, ``fence_redfish``, ``fence_apc``…, Debian's ``fence-agents``) and the
options it reads on its standard input, one ``key=value`` a line (``ip``, ``ipport``, ``username``,
``password`` or ``password_script``, ``lanplus``…).  The monitor adds ``action=off`` and then ``action=status``
(exit 2: off) to verify, as pacemaker does (node/fencing.py runs it).

Secrets: options whose name says password (``password``, ``snmp_priv_passwd``…) are shown masked everywhere the
API and CLI print a node; they go to the agent on its standard input only, never on a command line.

This module is pure: it validates and formats, it runs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deckard.model.errors import BadInput

AGENT_RE = re.compile(r"^fence_[a-z0-9_]{1,60}$")  # a program of the fence agent API, looked up on PATH
KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
MAX_OPTIONS = 32
MAX_VALUE = 1024
# chosen by the monitor for each call; an operator's value would turn a power-off into something else
RESERVED_KEYS = frozenset({"action", "nodename"})
MASK = "********"
_SECRET_RE = re.compile(r"passw|secret|token|community")


def is_secret(key: str) -> bool:
    """Whether an option is a secret shown masked (``password``, ``passwd``, ``snmp_priv_passwd``, …)."""
    return bool(_SECRET_RE.search(key)) and not key.endswith("_script")


@dataclass(frozen=True)
class FenceConfig:
    """One node's fence agent and its options (validated)."""

    agent: str
    options: Mapping[str, str] = field(default_factory=dict)

    def stdin(self, action: str) -> bytes:
        """What the agent reads on its standard input for ``action`` (``off``, ``status``, ``metadata``)."""
        lines = [f"action={action}", *(f"{k}={v}" for k, v in sorted(self.options.items()))]
        return ("\n".join(lines) + "\n").encode()

    def masked(self) -> dict[str, str]:
        return masked_options(self.options)


def masked_options(options: Mapping[str, Any]) -> dict[str, str]:
    """The options as the API and CLI may show them: secrets replaced by ``********``."""
    return {k: (MASK if is_secret(k) else str(v)) for k, v in sorted(options.items())}


def parse_options(pairs: Iterable[str]) -> dict[str, str]:
    """``["ip=10.0.0.9", "lanplus=1"]`` (the CLI's repeated ``--option``) as a mapping.

    A secret is refused here: a command line is visible to every user of the machine (``ps``), so the password
    comes from a file (``--password-file``) or the agent's own ``password_script``.
    """
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BadInput(f"fence option {pair!r} is not KEY=VALUE (e.g. ip=10.0.0.9)", code="bad_fence_option")
        if is_secret(key.strip()):
            raise BadInput(
                f"fence option {key.strip()!r} is a secret: give it in a file (--password-file; `deckard node`: "
                "--fence-password-file), never on a command line, where every user of the machine can read it",
                code="bad_fence_option",
            )
        out[key.strip()] = value
    return out


def fence_config(agent: str, options: Mapping[str, Any] | None = None) -> FenceConfig:
    """A validated fence configuration; ``BadInput`` (``bad_fence_agent`` / ``bad_fence_option``) says what to fix."""
    if not AGENT_RE.match(agent):
        raise BadInput(
            f"fence agent {agent!r} is not a fence agent program name: use one such as fence_ipmilan or fence_redfish "
            "(Debian package fence-agents), or no agent to use the farm's default fencing",
            code="bad_fence_agent",
        )
    options = dict(options or {})
    if len(options) > MAX_OPTIONS:
        raise BadInput(f"at most {MAX_OPTIONS} fence options", code="bad_fence_option")
    clean: dict[str, str] = {}
    for key, value in options.items():
        if not isinstance(key, str) or not KEY_RE.match(key):
            raise BadInput(
                f"fence option name {key!r}: lower-case letters, digits, '_' or '-' (as the agent's "
                "metadata names them, e.g. ip, ipport, username, password, lanplus)",
                code="bad_fence_option",
            )
        if key in RESERVED_KEYS:
            raise BadInput(
                f"fence option {key!r} is chosen by Deckard for each call; leave it out", code="bad_fence_option"
            )
        if isinstance(value, bool):
            value = "1" if value else "0"
        if not isinstance(value, str | int | float):
            raise BadInput(f"fence option {key!r} must be a string or a number", code="bad_fence_option")
        text = str(value)
        if len(text) > MAX_VALUE or any(c in text for c in "\n\r\0"):
            raise BadInput(f"fence option {key!r}: one line of at most {MAX_VALUE} characters", code="bad_fence_option")
        clean[key] = text
    return FenceConfig(agent, clean)


def stored_fence(agent: str | None, options: Mapping[str, Any] | None) -> FenceConfig | None:
    """The configuration a node row holds, or None when the node has none (the farm's default fencing applies)."""
    if not agent:
        return None
    return FenceConfig(agent, {str(k): str(v) for k, v in (options or {}).items()})
