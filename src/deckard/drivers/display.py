"""The desktop's display secret: how the broker, and nobody else, gets past a desktop's VNC server.

Xvnc in every desktop requires VNC authentication.  Its password is derived from the desktop's per-start
agent token (:func:`display_password`), so it changes at every start and needs no column of its own; the
driver writes it into the guest in Xvnc's password-file format (:func:`vnc_password_file`) and the broker
answers Xvnc's challenge with it (:func:`vnc_auth_response`).  VNC authentication is single DES with an
8-byte password: on its own it would be weak, which is why the desktop network also keeps desktops apart
and the broker never offers it to clients (they are authenticated by the broker instead).

RFB's quirk, shared by both functions: a DES key is 8 bytes with each byte's bits reversed.  Single DES is
triple DES with one key three times.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

# the fixed key every VNC implementation obfuscates stored passwords with (d3des byte order)
_PASSWORD_FILE_KEY = bytes([23, 82, 107, 6, 35, 78, 88, 7])


def display_password(agent_token: str) -> str:
    """The desktop's VNC password: 8 printable characters (all that VNC authentication uses)."""
    digest = hmac.new(agent_token.encode(), b"deckard-display-v1", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode()[:8]


def nx_cookie(agent_token: str) -> str:
    """The desktop's nxagent cookie (32 hex digits): nxagent refuses a proxy whose options lack it.  The agent
    derives the same value from the token it holds (``deckard-vma``'s ``nx_cookie``)."""
    return hmac.new(agent_token.encode(), b"deckard-nx-cookie-v1", hashlib.sha256).hexdigest()[:32]


def _des_ecb(key: bytes, data: bytes) -> bytes:
    rfb_key = bytes(int(f"{b:08b}"[::-1], 2) for b in key[:8].ljust(8, b"\0"))
    encryptor = Cipher(TripleDES(rfb_key * 3), modes.ECB()).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """The answer to a 16-byte VNC authentication challenge."""
    return _des_ecb(password.encode(), challenge[:16])


def load_des() -> None:
    """Have OpenSSL load DES now (its legacy provider: 2-10 ms the first time in a process), so that a node's
    first desktop start and a broker's first display connection do not pay it (called as they start)."""
    vnc_password_file("")


def vnc_password_file(password: str) -> bytes:
    """The 8 bytes of a VNC password file (``-rfbauth``/``PasswordFile``) holding ``password``."""
    return _des_ecb(_PASSWORD_FILE_KEY, password.encode()[:8].ljust(8, b"\0"))
