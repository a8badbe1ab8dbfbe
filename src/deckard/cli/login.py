"""``deckard login URL --user NAME``: log in to a remote farm's API and write the CLI profile, pinning its TLS.

Why pinning and never "accept anything": a farm's API certificate is signed by the farm's own CA, which no
system trust store knows.  With ``--ca`` the server is verified against that CA.  Without it the command fetches
the certificate the server presents, shows its SHA-256 fingerprint and asks the administrator to confirm it
(compare it with ``deckard`` output on the farm, or pass ``--fingerprint`` to do it non-interactively); what was
confirmed is saved next to the profile and every later command verifies the server against it.

An administrator with a second factor gives the authenticator app's code with ``--code``, or is asked for it
when the server answers ``totp_required`` (a recovery code works too).
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer

from deckard.cli import session
from deckard.cli.output import print_done
from deckard.cli.session import ERROR_EXIT, PROMPTED, JsonOpt, ProfileOpt
from deckard.client.api import ApiClient
from deckard.client.profile import Profile, default_profile_path, save_profile
from deckard.model.errors import DeckardError, Unauthenticated, Unavailable
from deckard.model.schemas import LoginResult


def fetch_server_certificate(url: str, timeout: float = 10.0) -> bytes:
    """The DER certificate the server presents (unverified: it is shown to a person before it is trusted)."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise Unavailable(f"{url!r} is not an https:// URL", code="bad_url")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only to read the certificate for the fingerprint check below
    try:
        with (
            socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout) as sock,
            ctx.wrap_socket(sock, server_hostname=parts.hostname) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError as e:
        raise Unavailable(f"cannot reach {url}: {e}", code="api_unreachable") from e
    if not der:
        raise Unavailable(f"{url} presented no certificate", code="no_certificate")
    return der


def fingerprint(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _same_fingerprint(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        return s.replace(":", "").replace(" ", "").lower().removeprefix("sha256")

    return norm(a) == norm(b)


def _log_in(client: ApiClient, user: str, password: str, tenant: str | None, code: str | None) -> LoginResult:
    """The login, and its second step when the server asks for a code that was not given."""
    try:
        return client.login(user, password, tenant, code)
    except Unauthenticated as e:
        challenge = e.details.get("challenge")
        if e.code != "totp_required" or not challenge:
            raise
    entered = typer.prompt("Code from your authenticator app (or a recovery code)", err=True)
    return client.login_second_factor(str(challenge), entered.strip())


LoginPasswordOpt = Annotated[
    str,
    typer.Option(
        "--password", envvar="DECKARD_PASSWORD", help="The administrator's password (asked for if missing).", **PROMPTED
    ),
]


def login(
    url: Annotated[str, typer.Argument(help="The farm's API, e.g. https://farm.example:8444.")],
    user: Annotated[str, typer.Option("--user", "-u", help="Administrator name.")],
    password: LoginPasswordOpt,
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="The administrator's tenant.")] = None,
    ca: Annotated[
        Path | None, typer.Option("--ca", exists=True, dir_okay=False, help="The farm's CA certificate.")
    ] = None,
    expected: Annotated[
        str | None, typer.Option("--fingerprint", help="SHA-256 fingerprint of the server certificate to pin.")
    ] = None,
    code: Annotated[
        str | None,
        typer.Option("--code", help="The authenticator app's code (asked for when the server wants one)."),
    ] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Log in to a farm's API and save the profile (URL, session token, pinned certificate)."""
    profile_path = profile or default_profile_path()
    pinned = profile_path.with_name(profile_path.stem + ".ca.pem")
    url = url.rstrip("/")
    try:
        if ca is not None:
            pinned.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if ca.resolve() != pinned.resolve():
                shutil.copyfile(ca, pinned)
        else:
            der = fetch_server_certificate(url)
            fp = fingerprint(der)
            if expected is not None:
                if not _same_fingerprint(expected, fp):
                    session.errors.print(
                        f"error [fingerprint_mismatch]: the server's certificate is {fp}, not {expected}: "
                        "do not trust this server",
                        style="red",
                        markup=False,
                    )
                    raise typer.Exit(ERROR_EXIT)
            else:
                typer.echo(f"The server's certificate has the SHA-256 fingerprint\n  {fp}")
                if not typer.confirm("Does it match the farm's? Trust it", default=False):
                    session.errors.print("error [not_trusted]: certificate not confirmed", style="red", markup=False)
                    raise typer.Exit(ERROR_EXIT)
            pinned.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            pinned.write_text(ssl.DER_cert_to_PEM_cert(der))
        with ApiClient(url, None, pinned) as client:
            out = _log_in(client, user, password, tenant, code)
        saved = save_profile(profile_path, Profile(url=url, token=out.token, ca=pinned))
    except DeckardError as e:
        session.report(e)
        raise typer.Exit(ERROR_EXIT) from None
    print_done(
        f"logged in to {url} as {user}; profile {saved} (session until {out.expires_at})",
        {"url": url, "profile": str(saved), "ca": str(pinned), "expires_at": out.expires_at.isoformat()},
        as_json=as_json,
    )
