"""A real OpenID provider for tests: ``tests/oidc/provider.mjs`` (node-oidc-provider) in a child process.

::

    with OidcProvider(users=[{"login": "alice", "password": "pw", ...}], clients=[{"client_id": ...}]) as op:
        OidcClient(OidcConfig(issuer=op.issuer, ...))

The provider listens on a free port of 127.0.0.1 (it picks it and prints ``READY <port>``), plain HTTP unless
``tls=(certificate, key)`` is given, keeps everything in memory, and is killed when the block ends, whatever
happened in it.  ``npm ci`` runs in ``tests/oidc`` first only when its ``node_modules`` is missing (``make test``
installs it beforehand).  Without node (20.19 or later) the test is skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

PROVIDER_DIR = Path(__file__).resolve().parent / "oidc"
START_TIMEOUT_S = 15.0


MIN_NODE = (20, 19)  # what oidc-provider 9 and jose 6 need (tests/oidc/package.json "engines")


def _ensure_node_modules() -> str:
    """The node binary, after installing the provider's packages if they are missing; skips without node."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the OpenID provider for these tests runs on Node.js 20.19 or later")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if tuple(int(n) for n in version.lstrip("v").split(".")[:2]) < MIN_NODE:
        pytest.skip(f"node {version} is too old: the OpenID provider for these tests needs Node.js 20.19 or later")
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip(f"npm is not installed, and {PROVIDER_DIR / 'node_modules'} is missing (run npm ci there)")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PROVIDER_DIR, check=True, timeout=300
        )
    return node


class OidcProvider:
    """A running provider with these users ({login, password, name, email, groups}) and clients
    ({client_id, client_secret (none: a public client), redirect_uris, post_logout_redirect_uris, ...})."""

    def __init__(
        self, users: list[dict[str, Any]], clients: list[dict[str, Any]], tls: tuple[Path, Path] | None = None
    ) -> None:
        self.users = users
        self.clients = clients
        self.tls = tls  # (certificate, key) PEM files: serve HTTPS
        self.port = 0
        self.issuer = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> OidcProvider:
        node = _ensure_node_modules()
        self._dir = tempfile.TemporaryDirectory(prefix="deckard-oidc-")
        workdir = Path(self._dir.name)
        config = workdir / "config.json"
        settings: dict[str, Any] = {"port": 0, "users": self.users, "clients": self.clients}
        if self.tls:
            settings["tls"] = {"cert": str(self.tls[0]), "key": str(self.tls[1])}
        config.write_text(json.dumps(settings))
        log = workdir / "provider.log"
        # output goes to a file, not a pipe: nobody reads a pipe once READY is seen, and a full one would block node
        with log.open("wb") as out:
            self._proc = subprocess.Popen(
                [node, str(PROVIDER_DIR / "provider.mjs"), str(config)],
                cwd=PROVIDER_DIR,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            self.port = self._wait_ready(log)
        except BaseException:
            self.stop()
            self._cleanup()
            raise
        self.issuer = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self._cleanup()

    @property
    def pid(self) -> int:
        assert self._proc is not None, "the provider is not started"
        return self._proc.pid

    def stop(self) -> None:
        """Kill the provider now (a test of a provider that went away calls this itself)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3)

    def _wait_ready(self, log: Path) -> int:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("READY "):
                    return int(line.split()[1])
            if self._proc.poll() is not None:
                raise RuntimeError(f"the OpenID provider exited with {self._proc.returncode}:\n{log.read_text()}")
            time.sleep(0.02)
        raise RuntimeError(f"the OpenID provider did not start in {START_TIMEOUT_S:g} s:\n{log.read_text()}")

    def _cleanup(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
