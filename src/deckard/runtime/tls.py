"""TLS material of a farm: a CA made at first start, and server certificates signed by it.

Clients trust ``tls/ca.pem`` explicitly (``deckard connect`` and the CLI profile pin it): there is no
"accept any certificate" mode.

A farm's keys are RSA 3072 by default (setting ``broker.tls_key``; ``ec256`` for ECDSA P-256, the keys of farms
made before): QVD's clients judge a key by RSA sizes and call a 256-bit EC key "weak".  ``bench/tls_handshake.py``
measured what it costs: about 2 ms more of the broker's CPU per full handshake, and seconds to make the keys
(docs/clients.md says why that is worth it).  A farm whose server key is of the other type gets a new server
certificate from the same CA at its next start; clients, which trust the CA, do not notice.  The function's
own default stays ``ec256`` for the tests' throwaway farms, which would otherwise wait seconds for RSA keys.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


KEY_TYPES = ("rsa3072", "ec256")
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "rsa3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    if key_type == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown TLS key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")


def _is_type(key_file: Path, key_type: str) -> bool:
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    except (OSError, ValueError):
        return False
    if key_type == "rsa3072":
        return isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 3072
    return isinstance(key, ec.EllipticCurvePrivateKey)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ensure_tls(tls_dir: Path, extra_names: list[str] | None = None, key_type: str = "ec256") -> tuple[Path, Path, Path]:
    """Create (once) the farm CA and a server certificate with ``key_type`` keys; return (ca.pem, server.pem,
    server.key).  A server key of another type is replaced (same CA); the CA is never replaced."""
    if key_type not in KEY_TYPES:
        raise ValueError(f"unknown TLS key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")
    tls_dir.mkdir(parents=True, exist_ok=True)
    # the processes of one farm that start together (its nodes on one machine) make the CA and the certificate one
    # after the other: another's half-written ca.pem read here was a start failing on a malformed PEM
    with open(tls_dir / ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        return _ensure_tls(tls_dir, extra_names or [], key_type)


def _ensure_tls(tls_dir: Path, extra_names: list[str], key_type: str) -> tuple[Path, Path, Path]:
    ca_pem, ca_key = tls_dir / "ca.pem", tls_dir / "ca.key"
    if not ca_pem.exists() or not ca_key.exists():
        now = dt.datetime.now(dt.UTC)
        key = _new_key(key_type)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Deckard farm CA {socket.gethostname()}")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256())
        )
        _write_private(ca_key, _key_pem(key))
        ca_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tls_dir / "server.pem").unlink(missing_ok=True)
    srv_pem, srv_key = ensure_server_cert(tls_dir, tls_dir, extra_names, key_type)
    return ca_pem, srv_pem, srv_key


def ensure_server_cert(tls_dir: Path, out_dir: Path, names: list[str], key_type: str) -> tuple[Path, Path]:
    """A server certificate in ``out_dir`` signed by the farm CA of ``tls_dir`` for this host, localhost and
    ``names`` (addresses or DNS names): made when missing, of another key type, or without one of ``names``.
    A node on a machine of its own gets one in its run directory naming the address its broker listens on."""
    out_dir.mkdir(parents=True, exist_ok=True)
    srv_pem, srv_key = out_dir / "server.pem", out_dir / "server.key"
    host = socket.gethostname()
    sans: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(host)]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    if srv_pem.exists() and srv_key.exists() and _is_type(srv_key, key_type):
        current = x509.load_pem_x509_certificate(srv_pem.read_bytes())
        with contextlib.suppress(x509.ExtensionNotFound):
            if set(sans) <= set(current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value):
                return srv_pem, srv_key
    ca_cert = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    ca_private = serialization.load_pem_private_key((tls_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    now = dt.datetime.now(dt.UTC)
    key = _new_key(key_type)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_private, hashes.SHA256())
    )
    _write_private(srv_key, _key_pem(key))
    srv_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return srv_pem, srv_key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # TLS 1.2: a client cannot make the server handshake again mid-stream
    ctx.load_cert_chain(cert, key)
    return ctx


_client_contexts: dict[tuple[str, int, int, int], ssl.SSLContext] = {}


def new_client_context(ca: Path) -> ssl.SSLContext:
    """A context of its own that trusts ``ca`` alone, for a caller that changes it."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def client_context(ca: Path) -> ssl.SSLContext:
    """:func:`new_client_context`, made once per version of the file and shared, so not to be changed: making one
    reads and parses the CA (~0.9 ms, more than a handshake's own CPU), which a process that connects again (a
    client reconnecting, the benchmarks) would pay every time.  A CA file replaced in place is read again."""
    st = os.stat(ca)
    key = (str(ca), st.st_ino, st.st_mtime_ns, st.st_size)
    ctx = _client_contexts.get(key)
    if ctx is None:
        if len(_client_contexts) >= 16:  # bounded: a process that meets many CA files keeps the latest
            _client_contexts.clear()
        ctx = _client_contexts[key] = new_client_context(ca)
    return ctx
