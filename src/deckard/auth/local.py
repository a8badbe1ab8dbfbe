"""Local passwords: argon2id hashes (QVD used one global salt with SHA-256; never again)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from functools import cache
from typing import Any, ClassVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from deckard.auth.chain import Credentials, Decision, Identity

# Interactive logins: the library's RFC 9106 low-memory profile keeps a login under ~50 ms on two cores.
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


@cache
def _decoy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when ``password`` matches.  No hash (an unknown name, an account without a password) costs the same
    argon2 run against a decoy, so the time a login takes does not tell which names exist."""
    try:
        return _hasher.verify(password_hash or _decoy_hash(), password) and bool(password_hash)
    except (VerificationError, InvalidHashError):
        return False


async def verify_password_async(password_hash: str | None, password: str) -> bool:
    return await asyncio.to_thread(verify_password, password_hash, password)


class RecentLogins:
    """Passwords argon2 confirmed in the last ``seconds``, so the same person's next login skips the hash (~40 ms
    of a core): QVD's client authenticates its list and its connect separately, and a reconnect comes right after.

    Kept in this process's memory only, as a MAC of the password under a key drawn at start, indexed by the stored
    hash: a changed password has another hash, so its entry is never found again.  Only a success is remembered;
    a password that does not match the entry still costs argon2, so a guess is as slow as ever.  At most ``size``
    entries (the oldest go first)."""

    def __init__(self, seconds: float, size: int = 10_000) -> None:
        self.seconds, self.size = seconds, size
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def _mac(self, password_hash: str, password: str) -> bytes:
        return hmac.new(self._key, f"{password_hash}\0{password}".encode(), hashlib.sha256).digest()

    def confirms(self, password_hash: str, password: str) -> bool:
        entry = self._entries.get(password_hash)
        if entry is None:
            return False
        if entry[1] < time.monotonic():
            del self._entries[password_hash]
            return False
        return hmac.compare_digest(entry[0], self._mac(password_hash, password))

    def remember(self, password_hash: str, password: str) -> None:
        if self.seconds <= 0:
            return
        self._entries[password_hash] = (self._mac(password_hash, password), time.monotonic() + self.seconds)
        self._entries.move_to_end(password_hash)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class LocalAuthenticator:
    """Deckard's own passwords.  A name without a local password (unknown, or an account of a directory) passes,
    after the same argon2 work as a wrong password, so the chain's next plugin can decide.  A password confirmed
    a moment ago (``auth.local.remember_s``) is confirmed again without argon2 (:class:`RecentLogins`)."""

    name: ClassVar[str] = "local"

    def __init__(self, remember_s: float = 0.0) -> None:
        self.recent = RecentLogins(remember_s)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LocalAuthenticator:
        return cls(float(config.get("auth.local.remember_s", 0)))

    async def authenticate(self, creds: Credentials) -> Decision:
        password_hash = creds.password_hash
        if password_hash is not None and self.recent.confirms(password_hash, creds.password):
            return Decision.accept(Identity(creds.login, creds.tenant, self.name))
        ok = await verify_password_async(password_hash, creds.password)
        if password_hash is None:
            return Decision.pass_(self.name, "no local password")
        if not ok:
            return Decision.reject(self.name)
        self.recent.remember(password_hash, creds.password)
        return Decision.accept(Identity(creds.login, creds.tenant, self.name))
