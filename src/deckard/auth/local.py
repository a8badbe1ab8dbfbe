"""Local passwords: argon2id hashes (QVD used one global salt with SHA-256; never again)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any, ClassVar

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from argon2.low_level import core, error_to_str, ffi

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
    encoded = password_hash or _decoy_hash()
    try:
        with _ARENAS.taken() as arena:
            if arena is not None:  # the hash computed in memory kept from the last login
                return _verify_in(arena, encoded, password) and bool(password_hash)
        return _hasher.verify(encoded, password) and bool(password_hash)  # all in use: argon2's own malloc
    except (VerificationError, InvalidHashError):
        return False


# ---- argon2's memory kept between logins ----------------------------------------------------------------------
# argon2 fills ``memory_cost`` KiB (19 MiB) at each check.  libargon2 takes it from malloc, and the broker's process
# maps every big allocation afresh (broker/server.py ``bound_the_heap``: streams' buffers go back to the system at
# free), so each login faulted in 4,865 zeroed pages: 27-31 ms a check, 8-20 ms of it in the kernel, against 17 ms
# in memory already there.  A server keeps ``ARENAS`` arenas, made at its start (``warm``; elsewhere at first use);
# a check that finds them all in use runs as before.  libargon2 wipes the memory after each run, as before a free.

ARENAS = min(2, os.cpu_count() or 1)  # checks at once in kept memory (a login storm on two cores), 19 MiB each


class _Arenas:
    def __init__(self, count: int, kib: int) -> None:
        self.count, self.kib = count, kib
        self._free: list[tuple[bytearray, Any]] = []
        self._made = 0
        self._lock = threading.Lock()

    def _make(self) -> tuple[bytearray, Any]:
        self._made += 1
        memory = bytearray(self.kib * 1024)  # zeroed: its pages are faulted in once, here
        return memory, ffi.from_buffer("uint8_t[]", memory)

    def fill(self) -> None:
        """Every arena made now (a server's start), none later: the process's memory does not grow at a storm."""
        with self._lock:
            while self._made < self.count:
                self._free.append(self._make())

    @contextlib.contextmanager
    def taken(self) -> Iterator[tuple[bytearray, Any] | None]:
        with self._lock:
            if self._free:
                arena = self._free.pop()
            elif self._made < self.count:
                arena = self._make()
            else:
                arena = None
        try:
            yield arena
        finally:
            if arena is not None:
                with self._lock:
                    self._free.append(arena)


_ARENAS = _Arenas(ARENAS, _hasher.memory_cost)
_in_use = threading.local()  # the arena of this thread's check, for libargon2's allocation callback


ARGON2_OK, ARGON2_MEMORY_ALLOCATION_ERROR = 0, -22  # argon2.h


def _allocate(memory: Any, size: int) -> int:
    arena = getattr(_in_use, "arena", None)
    if arena is None or size > len(arena[0]):
        return ARGON2_MEMORY_ALLOCATION_ERROR
    memory[0] = arena[1]
    return ARGON2_OK


def _release(memory: Any, size: int) -> None:
    """The arena stays (libargon2 has wiped it)."""


# libargon2's allocate_cbk and free_cbk (an exception in one is an allocation error, not a 0 taken for "done")
_ALLOCATE = ffi.callback("int(uint8_t **, size_t)", _allocate, error=ARGON2_MEMORY_ALLOCATION_ERROR)
_RELEASE = ffi.callback("void(uint8_t *, size_t)", _release)


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _verify_in(arena: tuple[bytearray, Any], encoded: str, password: str) -> bool:
    """argon2 of ``password`` with ``encoded``'s parameters and salt, computed in ``arena``, against its hash."""
    params = extract_parameters(encoded)  # InvalidHashError when it is not an argon2 hash
    try:
        salt, want = (_b64(part) for part in encoded.rsplit("$", 2)[1:])
    except ValueError:
        raise InvalidHashError(encoded) from None
    if params.memory_cost * 1024 > len(arena[0]):  # a hash made with more memory than kept: argon2's own malloc
        return _hasher.verify(encoded, password)
    secret = password.encode()
    out = ffi.new("uint8_t[]", len(want))
    keep = [ffi.new("uint8_t[]", secret), ffi.new("uint8_t[]", salt)]  # alive until argon2 returns
    context = ffi.new(
        "argon2_context *",
        {
            "out": out,
            "outlen": len(want),
            "pwd": keep[0],
            "pwdlen": len(secret),
            "salt": keep[1],
            "saltlen": len(salt),
            "t_cost": params.time_cost,
            "m_cost": params.memory_cost,
            "lanes": params.parallelism,
            "threads": params.parallelism,
            "version": params.version,
            "allocate_cbk": _ALLOCATE,
            "free_cbk": _RELEASE,
            "flags": 0,  # ARGON2_DEFAULT_FLAGS
        },
    )
    _in_use.arena = arena
    try:
        code = core(context, params.type.value)
    finally:
        _in_use.arena = None
    if code != ARGON2_OK:
        raise VerificationError(error_to_str(code))
    return hmac.compare_digest(bytes(out), want)


def warm() -> None:
    """A server's start: the arenas made and the decoy hash too, so its first login costs what the next do."""
    _ARENAS.fill()
    verify_password(None, "")


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
