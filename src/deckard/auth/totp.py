"""Time-based one-time passwords (RFC 6238) and recovery codes: the arithmetic of a second factor, no storage.

A TOTP code is the HMAC of a 30-second *step* number; anyone who sees a code (over a shoulder, in a proxy log)
can replay it while its step is in the accepted window.  So ``verify_code`` answers with the step it matched,
the caller stores the newest step used, and only a code of a *later* step is accepted next time: a used code,
or an older one after a newer one was used, is refused.  The window (one step either side by default) forgives
a phone clock that is a little off.

Recovery codes are for the day the phone is lost: random, single use, shown once and stored as SHA-256 hashes.
60 random bits cannot be guessed through a login form, so they need no slow hash (unlike passwords).  They are
written in Crockford's base32 alphabet, which has no ``i``, ``l``, ``o`` or ``u``; normalising maps the letters
people mistake for digits back (``O`` → ``0``, ``I``/``L`` → ``1``), so a code read off paper still works.

Secrets never leave this module except to be stored, or shown once to the person enrolling.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

import pyotp

STEP_S = 30  # seconds per step: what every authenticator app uses by default
DIGITS = 6
SECRET_BYTES = 20  # 160 bits, RFC 4226's recommendation; 32 base32 characters, no padding
RECOVERY_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32: 5 bits per character
RECOVERY_GROUPS = 3
RECOVERY_GROUP_LEN = 4  # xxxx-xxxx-xxxx: 12 characters, 60 bits
_CONFUSABLE = str.maketrans({"o": "0", "i": "1", "l": "1", "-": None})


def new_secret() -> str:
    """A fresh 160-bit TOTP secret in base32, as authenticator apps expect it."""
    return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def provisioning_uri(secret: str, account: str, issuer: str) -> str:
    """The ``otpauth://totp/Issuer:account?secret=…&issuer=…`` URI an authenticator app reads (often as a QR
    code); ``account`` names the account in the app, e.g. ``alice@default``."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S).provisioning_uri(name=account, issuer_name=issuer)


def step_at(now: float) -> int:
    """The step number of a Unix time."""
    return int(now // STEP_S)


def _digits(code: str) -> str | None:
    """The code without spaces if it is six ASCII digits, else None."""
    code = "".join(code.split())
    return code if len(code) == DIGITS and code.isascii() and code.isdigit() else None


def looks_like_totp_code(code: str) -> bool:
    """Whether ``code`` has the shape of a TOTP code (six digits, spaces allowed) rather than a recovery code."""
    return _digits(code) is not None


def verify_code(secret: str, code: str, *, last_step: int, now: float | None = None, window: int = 1) -> int | None:
    """The step ``code`` is valid for, among steps ``now - window … now + window`` later than ``last_step``;
    None when it matches none of them (wrong, too old, or already used).

    Every candidate is computed and compared in constant time, so the time taken does not tell which step
    (if any) matched.  Pass ``last_step=-1`` to ask whether the code is valid at all, used or not."""
    digits = _digits(code)
    if digits is None:
        return None
    otp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S)
    current = step_at(time.time() if now is None else now)
    matched: int | None = None
    for step in range(max(current - window, 0), current + window + 1):
        # no early exit: compare against every step of the window
        if hmac.compare_digest(otp.generate_otp(step).encode(), digits.encode()) and step > last_step:
            matched = step
    return matched


def new_recovery_codes(n: int = 10) -> list[str]:
    """``n`` fresh recovery codes like ``7hq2-m0xe-k4dp``: 60 random bits each, from an unambiguous alphabet."""
    return ["-".join(_random_group() for _ in range(RECOVERY_GROUPS)) for _ in range(n)]


def _random_group() -> str:
    return "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_GROUP_LEN))


def normalise_recovery_code(code: str) -> str:
    """What is hashed: lower case, without dashes or spaces, with ``o``/``i``/``l`` read as ``0``/``1``/``1``."""
    return "".join(code.lower().split()).translate(_CONFUSABLE)


def hash_recovery_code(code: str) -> str:
    """SHA-256 hex of the normalised code: what is stored and looked up."""
    return hashlib.sha256(normalise_recovery_code(code).encode()).hexdigest()
