"""The farm's TLS keys: RSA 3072 (what QVD's clients accept) or ECDSA P-256, and a change of type keeps the CA."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from deckard.runtime.settings import BrokerSettings
from deckard.runtime.tls import ensure_tls


def _server_key(path: Path) -> object:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_key()


def test_a_farms_broker_certificate_is_rsa_3072_by_default_and_verifies(tmp_path: Path) -> None:
    assert BrokerSettings().tls_key == "rsa3072"
    ca, cert, key = ensure_tls(tmp_path, key_type="rsa3072")
    public = _server_key(cert)
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 3072
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(ca))
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    done = set()
    for _ in range(10):
        for name, side, out, peer_in in (("c", cli, c_out, s_in), ("s", srv, s_out, c_in)):
            try:
                side.do_handshake()
                done.add(name)
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out.read())
    assert done == {"c", "s"}


def test_changing_the_key_type_replaces_the_server_certificate_and_keeps_the_ca(tmp_path: Path) -> None:
    ca, cert, _ = ensure_tls(tmp_path, key_type="ec256")
    ca_before = ca.read_bytes()
    assert isinstance(_server_key(cert), ec.EllipticCurvePublicKey)
    ensure_tls(tmp_path, key_type="rsa3072")
    assert isinstance(_server_key(cert), rsa.RSAPublicKey) and ca.read_bytes() == ca_before
    with pytest.raises(ValueError):
        ensure_tls(tmp_path, key_type="dsa")


def test_processes_starting_together_make_one_ca_and_a_certificate_it_signed(tmp_path: Path) -> None:
    """A farm's nodes on one machine start at once and share ``tls/``: each reads a whole CA, the same one, and the
    server certificate left is signed by it (reading another's half-written ``ca.pem`` failed a start)."""
    tls, go = tmp_path / "tls", tmp_path / "go"
    code = (  # imported first, then all at once
        "import sys, time, pathlib; from deckard.runtime.tls import ensure_tls\n"
        "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.001)\n"
        "ensure_tls(pathlib.Path(sys.argv[1]))"
    )
    args = [sys.executable, "-c", code, str(tls), str(go)]
    procs = [subprocess.Popen(args, stderr=subprocess.PIPE) for _ in range(8)]
    time.sleep(1.0)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-500:]
    ca = x509.load_pem_x509_certificate((tls / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((tls / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
