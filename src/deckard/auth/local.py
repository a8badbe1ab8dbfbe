"""Local passwords: argon2id hashes (QVD used one global salt with SHA-256; never again)."""

from __future__ import annotations

import asyncio
import secrets
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


class LocalAuthenticator:
    """Deckard's own passwords.  A name without a local password (unknown, or an account of a directory) passes,
    after the same argon2 work as a wrong password, so the chain's next plugin can decide."""

    name: ClassVar[str] = "local"

    @classmethod
    def from_config(cls, _config: Mapping[str, Any]) -> LocalAuthenticator:
        return cls()

    async def authenticate(self, creds: Credentials) -> Decision:
        password_hash = creds.password_hash
        ok = await verify_password_async(password_hash, creds.password)
        if password_hash is None:
            return Decision.pass_(self.name, "no local password")
        if not ok:
            return Decision.reject(self.name)
        return Decision.accept(Identity(creds.login, creds.tenant, self.name))
