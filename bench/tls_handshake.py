"""What the broker's certificate key costs (issue 13, part 4): full TLS handshakes per second, EC P-256 vs RSA 3072.

QVD's client judges a certificate's key by RSA sizes and calls the farm's 256-bit EC key weak; an RSA 3072 key
(NIST's match for 128-bit security, as P-256) satisfies it, but every full handshake then makes an RSA signature.
This measures the server's side of that: a farm CA and a broker certificate made by ``ensure_tls`` for each key
type, then full handshakes (no session resumption) between an ``ssl`` server and client over memory BIOs in one
thread, TLS 1.3 and TLS 1.2, for ``--seconds`` each.  It prints handshakes/s and the server's share of the CPU
time per handshake (the client side is timed apart and subtracted), plus the time to make the keys.

Usage: ``.venv/bin/python bench/tls_handshake.py [--seconds 3]`` (no root, no network).
"""

from __future__ import annotations

import argparse
import platform
import ssl
import tempfile
import time
from pathlib import Path

from deckard.runtime.tls import ensure_tls


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    data = src.read()
    if data:
        dst.write(data)


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[float, float]:
    """One full handshake; returns (server seconds, client seconds) of CPU spent in each side's steps."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    s_time = c_time = 0.0
    s_done = c_done = False
    while not (s_done and c_done):
        if not c_done:
            t = time.process_time()
            try:
                client.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
            c_time += time.process_time() - t
        _pump(c_out, s_in)
        if not s_done:
            t = time.process_time()
            try:
                server.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
            s_time += time.process_time() - t
        _pump(s_out, c_in)
    return s_time, c_time


def run(key: str, version: ssl.TLSVersion, seconds: float, tmp: Path) -> tuple[float, float, float]:
    t = time.perf_counter()
    ca, cert, key_file = ensure_tls(tmp / key, key_type=key)
    keygen = time.perf_counter() - t
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key_file)
    server_ctx.minimum_version = server_ctx.maximum_version = version
    server_ctx.options |= ssl.OP_NO_TICKET
    client_ctx = ssl.create_default_context(cafile=str(ca))
    n, server_cpu = 0, 0.0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s, _c = handshake(server_ctx, client_ctx)
        server_cpu += s
        n += 1
    wall = time.perf_counter() - t0
    return n / wall, server_cpu / n * 1000, keygen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {ssl.OPENSSL_VERSION}, one thread")
    print(f"{'key':<9} {'TLS':<5} {'handshakes/s':>13} {'server ms/handshake':>20} {'keys made in s':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for key in ("ec256", "rsa3072"):
            for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
                rate, server_ms, keygen = run(key, version, args.seconds, Path(tmp) / version.name)
                print(f"{key:<9} {version.name[4:]:<5} {rate:>13.0f} {server_ms:>20.2f} {keygen:>15.2f}")


if __name__ == "__main__":
    main()
