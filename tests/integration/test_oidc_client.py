"""Single sign-on against a real OpenID provider: OidcClient's authorization code flow with PKCE, and its refusals.

Real: node-oidc-provider (``tests/oidc``, a certified OpenID provider) on 127.0.0.1 with a password form, and
its tokens, keys and sessions; httpx plays the browser (the redirect to Deckard is captured, not served).
Faked, only where a test says so: a transport between OidcClient and the provider that rewrites what the provider
answers (a tampered or forged ID token, a discovery document that lists fewer methods) — a hostile network.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote_plus

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey

from deckard.auth.chain import AuthUnavailable
from deckard.auth.oidc import Flow, OidcClient, OidcConfig
from deckard.model.errors import BadInput, Unauthenticated
from deckard.runtime.tls import ensure_tls
from oidc_provider import OidcProvider

REDIRECT = "http://127.0.0.1:9/sso/callback"  # never served: the browser's redirect there is captured
LOGGED_OUT = "http://127.0.0.1:9/logged-out"
# RFC 6749 §2.3.1 form-encodes it inside HTTP Basic; long enough to be an HS256 key, for the forgery test
SECRET = "s3cret: with+special/chars & " + "x" * 32
PASSWORD = "correct horse battery staple"
USERS = [
    {
        "login": "Alice",
        "password": PASSWORD,
        "name": "Alice Liddell",
        "email": "alice@example.org",
        "groups": ["staff", "desktop-admins", 7],  # the 7 is not a group name and must be dropped
    },
]
CLIENTS = [
    {
        "client_id": "deckard",
        "client_secret": SECRET,
        "redirect_uris": [REDIRECT],
        "post_logout_redirect_uris": [LOGGED_OUT],
    },
    {"client_id": "deckard-public", "redirect_uris": [REDIRECT], "post_logout_redirect_uris": [LOGGED_OUT]},
]


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcProvider]:
    with OidcProvider(USERS, CLIENTS) as op:
        yield op


@pytest.fixture(scope="module")
def own_key() -> RSAKey:
    """A key that only the tests hold: added to the provider's JWKS by ``Tamper`` to sign forged ID tokens."""
    return RSAKey.generate_key(2048, parameters={"kid": "test-key", "use": "sig", "alg": "RS256"})


def config_for(provider: OidcProvider, **overrides: Any) -> OidcConfig:
    return replace(OidcConfig(issuer=provider.issuer, client_id="deckard", client_secret=SECRET), **overrides)


@contextlib.asynccontextmanager
async def oidc_client(
    config: OidcConfig, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[OidcClient]:
    client = OidcClient(config, transport=transport)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def client(provider: OidcProvider) -> AsyncIterator[OidcClient]:
    async with oidc_client(config_for(provider)) as c:
        yield c


class Tamper(httpx.AsyncBaseTransport):
    """The real network, except that the JSON of some answers goes through a test's function on its way back
    (which may return a whole other response)."""

    def __init__(
        self,
        id_token: Callable[[str], str] | None = None,
        jwks: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        discovery: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.rewrites = {"/token": id_token, "/jwks": jwks, "/.well-known/openid-configuration": discovery}
        self.requests: list[httpx.Request] = []

    @property
    def paths(self) -> list[str]:
        return [r.url.path for r in self.requests]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = await self.inner.handle_async_request(request)
        rewrite = self.rewrites.get(request.url.path)
        if rewrite is None or response.status_code != 200:
            return response
        doc = json.loads(await response.aread())
        if request.url.path == "/token":
            doc["id_token"] = rewrite(doc["id_token"])
        else:
            doc = rewrite(doc)
        return doc if isinstance(doc, httpx.Response) else httpx.Response(200, json=doc)

    async def aclose(self) -> None:
        await self.inner.aclose()


def with_key(key: RSAKey) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A JWKS rewrite that adds ``key`` (public half) to the provider's keys."""
    return lambda jwks: {"keys": [*jwks["keys"], key.as_dict(private=False)]}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64_json(segment: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))  # type: ignore[no-any-return]


def token_parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A JWS's header and claims, unverified, and its signature segment."""
    header, payload, signature = token.split(".")
    return unb64_json(header), unb64_json(payload), signature


def resign(key: RSAKey | OctKey, alg: str = "RS256", kid: str | None = None, **claims: Any) -> Callable[[str], str]:
    """An ID token rewrite: the provider's claims, changed by ``claims`` (None deletes one), signed by ``key``."""

    def rewrite(token: str) -> str:
        header, payload, _ = token_parts(token)
        payload = {k: v for k, v in {**payload, **claims}.items() if v is not None}
        return jwt.encode({"alg": alg, "kid": kid or key.kid or header["kid"]}, payload, key, algorithms=[alg])

    return rewrite


async def browse(http: httpx.AsyncClient, response: httpx.Response) -> tuple[httpx.Response, dict[str, str] | None]:
    """Follow redirects as a browser would, up to a page (returned) or to Deckard's redirect URI (its query)."""
    while response.is_redirect:
        location = str(response.url.join(response.headers["location"]))
        if location.startswith(REDIRECT):
            return response, dict(httpx.URL(location).params)
        response = await http.get(location)
    return response, None


async def sign_in(
    url: str,
    login: str = "Alice",
    password: str = PASSWORD,
    *,
    button: str = "login",
    http: httpx.AsyncClient | None = None,
) -> tuple[httpx.Response, dict[str, str] | None]:
    """Open the authorization URL, fill the provider's form, press ``button`` (login or abort); the page shown
    last and, when the provider sent the browser back to Deckard, the callback's query parameters."""
    async with httpx.AsyncClient(timeout=5) if http is None else contextlib.nullcontext(http) as browser:
        page, params = await browse(browser, await browser.get(url))
        assert params is None and page.status_code == 200, page.text
        action = re.search(rf'<form method="post" action="([^"]+/{button})"', page.text)
        assert action, page.text
        form = {"login": login, "password": password} if button == "login" else {}
        return await browse(browser, await browser.post(page.url.join(action[1]), data=form))


async def callback(client: OidcClient, login: str = "Alice") -> tuple[Flow, dict[str, str]]:
    """A completed sign-in at the provider: the flow Deckard kept and the parameters the browser brings back."""
    url, flow = await client.begin(REDIRECT)
    _, params = await sign_in(url, login)
    assert params is not None and "code" in params, params
    return flow, params


async def refused(client: OidcClient, flow: Flow, params: dict[str, str]) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        await client.finish(flow, params)
    return caught.value


# -- signing in ----------------------------------------------------------------------------------------------------


async def test_sign_in_returns_the_person_the_provider_vouches_for(provider: OidcProvider, client: OidcClient) -> None:
    url, flow = await client.begin(REDIRECT)
    query = httpx.URL(url).params
    assert url.startswith(f"{provider.issuer}/auth?")
    assert query["code_challenge_method"] == "S256" and query["code_challenge"] != flow.code_verifier
    assert query["state"] == flow.state and query["nonce"] == flow.nonce and len(flow.state) >= 22  # >= 128 bits
    assert "code_verifier" not in url and SECRET not in url

    _, params = await sign_in(url)
    assert params is not None and params["state"] == flow.state
    identity, id_token = await client.finish(flow, params)

    assert identity.login == "alice"  # the login claim, lower-cased
    assert (identity.tenant, identity.plugin) == ("", "oidc")
    assert (identity.display_name, identity.mail) == ("Alice Liddell", "alice@example.org")
    assert identity.groups == ("staff", "desktop-admins")
    assert identity.external_id == f"{provider.issuer}|Alice"
    header, claims, _ = token_parts(id_token)
    assert header["alg"] == "RS256" and claims["aud"] == "deckard" and claims["nonce"] == flow.nonce


async def test_public_client_signs_in_with_pkce_alone(provider: OidcProvider) -> None:
    async with oidc_client(config_for(provider, client_id="deckard-public", client_secret="")) as client:
        flow, params = await callback(client)
        identity, _ = await client.finish(flow, params)
        assert identity.login == "alice"

        flow, params = await callback(client)
        error = await refused(client, replace(flow, code_verifier="x" * 64), params)  # the provider checks PKCE
        assert error.code == "sso_token_refused" and "invalid_grant" in error.message


@pytest.mark.parametrize(
    "offered,used",
    [
        (None, "client_secret_basic"),
        (["client_secret_post"], "client_secret_post"),
        (["client_secret_post", "client_secret_basic"], "client_secret_basic"),
    ],
)
async def test_the_client_authenticates_as_the_provider_advertises(
    provider: OidcProvider, offered: list[str] | None, used: str
) -> None:
    """oidc-provider takes either method from any client, so the token request itself is looked at."""
    network = Tamper(
        discovery=(lambda doc: {**doc, "token_endpoint_auth_methods_supported": offered}) if offered else None
    )
    async with oidc_client(config_for(provider), network) as client:
        flow, params = await callback(client)
        identity, _ = await client.finish(flow, params)
        assert identity.login == "alice"
    (request,) = [r for r in network.requests if r.url.path == "/token"]
    form = dict(parse_qsl(request.content.decode()))
    assert form["code_verifier"] == flow.code_verifier and form["code"] == params["code"]
    if used == "client_secret_basic":
        assert (
            request.headers["authorization"]
            == "Basic " + base64.b64encode(f"deckard:{quote_plus(SECRET)}".encode()).decode()
        )
        assert "client_secret" not in form
    else:
        assert "authorization" not in request.headers
        assert (form["client_id"], form["client_secret"]) == ("deckard", SECRET)


async def test_wrong_password_at_the_provider_shows_the_form_again_and_sends_no_code(client: OidcClient) -> None:
    url, _ = await client.begin(REDIRECT)
    page, params = await sign_in(url, password="wrong password")
    assert params is None
    assert "Wrong login or password." in page.text and 'name="password"' in page.text


async def test_a_login_claim_the_token_lacks_is_refused(provider: OidcProvider) -> None:
    async with oidc_client(config_for(provider, login_claim="upn")) as client:
        flow, params = await callback(client)
        error = await refused(client, flow, params)
        assert error.code == "sso_no_login_claim" and "'upn'" in error.message


# -- refusals of the callback --------------------------------------------------------------------------------------


async def test_cancelling_at_the_provider_is_sso_denied_with_its_reason(client: OidcClient) -> None:
    url, flow = await client.begin(REDIRECT)
    _, params = await sign_in(url, button="abort")
    assert params is not None and params["error"] == "access_denied" and "code" not in params
    error = await refused(client, flow, params)
    assert error.code == "sso_denied" and "cancelled the sign-in" in error.message

    error = await refused(client, flow, {"error": "server_error", "error_description": "x" * 10_000, "state": "?"})
    assert error.code == "sso_denied" and len(error.message) < 400


@pytest.mark.parametrize("state", [None, "", "forged-state"])
async def test_a_callback_for_another_sign_in_is_sso_bad_state(client: OidcClient, state: str | None) -> None:
    flow, params = await callback(client)
    params = {k: v for k, v in {**params, "state": state}.items() if v is not None}
    assert (await refused(client, flow, params)).code == "sso_bad_state"


async def test_a_callback_without_code_or_from_another_issuer_is_sso_bad_request(client: OidcClient) -> None:
    flow, params = await callback(client)
    assert params["iss"]  # the provider names itself (RFC 9207), so a mix-up is detectable
    without_code = {k: v for k, v in params.items() if k != "code"}
    assert (await refused(client, flow, without_code)).code == "sso_bad_request"
    assert (await refused(client, flow, {**params, "iss": "https://evil.example"})).code == "sso_bad_request"
    without_iss = {k: v for k, v in params.items() if k != "iss"}
    assert (await refused(client, flow, without_iss)).code == "sso_bad_request"
    identity, _ = await client.finish(flow, params)  # none of the above spent the code
    assert identity.login == "alice"


async def test_a_sign_in_older_than_ten_minutes_is_sso_expired(client: OidcClient) -> None:
    flow, params = await callback(client)
    assert (await refused(client, replace(flow, created_at=time.time() - 601), params)).code == "sso_expired"


async def test_a_replayed_code_is_sso_token_refused(client: OidcClient) -> None:
    flow, params = await callback(client)
    await client.finish(flow, params)
    error = await refused(client, flow, params)
    assert error.code == "sso_token_refused" and "invalid_grant" in error.message


async def test_an_id_token_for_another_sign_in_is_sso_bad_nonce(client: OidcClient) -> None:
    flow, params = await callback(client)
    assert (await refused(client, replace(flow, nonce="another-sign-in"), params)).code == "sso_bad_nonce"


# -- the ID token ----------------------------------------------------------------------------------------------------


ALGS = ["RS256", "HS256", "none"]


def flip_signature(token: str) -> str:
    head, payload, signature = token.split(".")
    return f"{head}.{payload}.{signature[:20]}{'A' if signature[20] != 'A' else 'B'}{signature[21:]}"


def change_claim(token: str) -> str:  # the provider's signature over a payload it did not sign
    head, _, signature = token.split(".")
    claims = token_parts(token)[1]
    return f"{head}.{b64(json.dumps({**claims, 'preferred_username': 'root'}).encode())}.{signature}"


def alg_none(token: str) -> str:
    _, payload, _ = token.split(".")
    return f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{payload}."


def hs256_with_client_secret(token: str) -> str:
    return resign(OctKey.import_key(SECRET), "HS256", kid=token_parts(token)[0]["kid"])(token)


def other_key_same_kid(token: str) -> str:
    return resign(RSAKey.generate_key(2048), kid=token_parts(token)[0]["kid"])(token)


def encrypted_looking(token: str) -> str:
    return token + ".x.y"


@pytest.mark.parametrize(
    "tamper",
    [flip_signature, change_claim, alg_none, hs256_with_client_secret, other_key_same_kid, encrypted_looking],
    ids=lambda f: f.__name__,
)
async def test_a_tampered_id_token_is_sso_bad_token(provider: OidcProvider, tamper: Callable[[str], str]) -> None:
    """Even from a provider that (foolishly) advertises ``none`` and HS256 for ID tokens."""
    lax = Tamper(id_token=tamper, discovery=lambda doc: {**doc, "id_token_signing_alg_values_supported": ALGS})
    async with oidc_client(config_for(provider), lax) as client:
        flow, params = await callback(client)
        error = await refused(client, flow, params)
        assert error.code == "sso_bad_token", error.message


@pytest.mark.parametrize(
    "claims,accepted",  # exp and iat in seconds from now
    [
        ({}, True),  # the test key is trusted: the forgery itself is not what gets refused
        ({"exp": -30}, True),  # within the 60 s leeway
        ({"exp": -120}, False),
        ({"iat": 3600}, False),
        ({"iss": "https://evil.example"}, False),
        ({"aud": "another-client"}, False),
        ({"aud": ["deckard", "another-client"]}, False),  # several audiences and no azp
        ({"aud": ["deckard", "another-client"], "azp": "deckard"}, True),
        ({"azp": "another-client"}, False),
        ({"sub": None}, False),
        ({"exp": None}, False),
    ],
    ids=[
        "as-issued",
        "expired-within-leeway",
        "expired",
        "issued-in-the-future",
        "another-issuer",
        "another-audience",
        "several-audiences-no-azp",
        "several-audiences-azp",
        "another-azp",
        "no-sub",
        "no-exp",
    ],
)
async def test_id_token_claims_are_checked(
    provider: OidcProvider, own_key: RSAKey, claims: dict[str, Any], accepted: bool
) -> None:
    now = int(time.time())
    claims = {k: now + v if k in ("exp", "iat") and v is not None else v for k, v in claims.items()}
    forge = Tamper(id_token=resign(own_key, **claims), jwks=with_key(own_key))
    async with oidc_client(config_for(provider), forge) as client:
        flow, params = await callback(client)
        if accepted:
            identity, _ = await client.finish(flow, params)
            assert identity.login == "alice"
        else:
            assert (await refused(client, flow, params)).code == "sso_bad_token"


async def test_an_unknown_key_id_fetches_the_keys_again_once(provider: OidcProvider, own_key: RSAKey) -> None:
    rotated = Tamper(id_token=resign(own_key))  # the provider never publishes the test key
    async with oidc_client(config_for(provider), rotated) as client:
        flow, params = await callback(client)
        error = await refused(client, flow, params)
        assert error.code == "sso_bad_token" and "test-key" in error.message
        assert rotated.paths.count("/jwks") == 2  # once at begin, once more for the unknown kid

    fetches = 0

    def publish_later(jwks: dict[str, Any]) -> dict[str, Any]:  # the provider rotates its keys after our first look
        nonlocal fetches
        fetches += 1
        return with_key(own_key)(jwks) if fetches > 1 else jwks

    rotating = Tamper(id_token=resign(own_key), jwks=publish_later)
    async with oidc_client(config_for(provider), rotating) as client:
        flow, params = await callback(client)
        identity, _ = await client.finish(flow, params)
        assert identity.login == "alice" and fetches == 2
        await client.begin(REDIRECT)
        assert rotating.paths.count("/.well-known/openid-configuration") == 1  # discovery is cached


# -- an absent, slow or confused provider --------------------------------------------------------------------------


async def test_a_provider_that_went_away_is_auth_unavailable() -> None:
    with OidcProvider(USERS, CLIENTS) as op:
        async with oidc_client(OidcConfig(issuer=op.issuer, client_id="deckard", client_secret=SECRET)) as client:
            flow, params = await callback(client)
            op.stop()
            started = time.monotonic()
            with pytest.raises(AuthUnavailable) as caught:
                await client.finish(flow, params)
            assert caught.value.status == 503 and "did not answer" in caught.value.message
        async with oidc_client(OidcConfig(issuer=op.issuer, client_id="deckard", timeout_s=1)) as client:
            with pytest.raises(AuthUnavailable):
                await client.begin(REDIRECT)
        assert time.monotonic() - started < 2


async def test_a_provider_that_does_not_answer_is_auth_unavailable_within_the_timeout() -> None:
    """Sign-ins that arrive together share one discovery attempt: each waits one timeout, not one per caller."""
    hold = asyncio.Event()
    connections = 0

    async def never_answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.CancelledError):
            await hold.wait()
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with oidc_client(OidcConfig(issuer=f"http://127.0.0.1:{port}", client_id="x", timeout_s=0.5)) as client:
            started = time.monotonic()
            outcomes = await asyncio.gather(*(client.begin(REDIRECT) for _ in range(5)), return_exceptions=True)
            assert 0.4 < time.monotonic() - started < 1.5
            assert all(isinstance(o, AuthUnavailable) for o in outcomes), outcomes
            assert "0.5 s" in outcomes[0].details["reason"]  # type: ignore[union-attr]
            assert connections == 1
    finally:
        hold.set()
        server.close()
        await server.wait_closed()


async def test_the_provider_certificate_is_checked_against_ca_file(tmp_path: Path) -> None:
    ca, cert, key = ensure_tls(tmp_path / "tls")
    with OidcProvider(USERS, CLIENTS, tls=(cert, key)) as op:
        assert op.issuer.startswith("https://")
        async with oidc_client(OidcConfig(issuer=op.issuer, client_id="deckard", ca_file=str(ca))) as client:
            url, _ = await client.begin(REDIRECT)
            assert url.startswith(f"{op.issuer}/auth?")
        async with oidc_client(OidcConfig(issuer=op.issuer, client_id="deckard")) as client:
            with pytest.raises(AuthUnavailable) as caught:  # the system's CAs do not know the farm's CA
                await client.begin(REDIRECT)
            assert "CERTIFICATE_VERIFY_FAILED" in caught.value.details["reason"]
    with pytest.raises(BadInput) as bad:
        OidcClient(OidcConfig(issuer="https://sso.example", client_id="deckard", ca_file=str(tmp_path / "none.pem")))
    assert bad.value.code == "sso_bad_ca_file"


@pytest.mark.parametrize(
    "discovery",
    [
        lambda _: httpx.Response(503, text="maintenance"),
        lambda _: httpx.Response(200, text="<html>a login page</html>"),
        lambda doc: [doc],  # JSON, but not an object
        lambda doc: {k: v for k, v in doc.items() if k != "token_endpoint"},
        lambda doc: {**doc, "jwks_uri": 42},
        lambda doc: {**doc, "issuer": "https://evil.example"},
    ],
    ids=["503", "not-json", "not-an-object", "no-token-endpoint", "jwks-uri-not-a-url", "another-issuer"],
)
async def test_a_confused_discovery_document_is_auth_unavailable(
    provider: OidcProvider, discovery: Callable[[dict[str, Any]], Any]
) -> None:
    async with oidc_client(config_for(provider), Tamper(discovery=discovery)) as client:
        with pytest.raises(AuthUnavailable):
            await client.begin(REDIRECT)


async def test_a_wrong_issuer_url_is_auth_unavailable(provider: OidcProvider) -> None:
    async with oidc_client(config_for(provider, issuer=provider.issuer + "/nowhere")) as client:
        with pytest.raises(AuthUnavailable) as caught:
            await client.begin(REDIRECT)
        assert "404" in caught.value.details["reason"]


# -- signing out, configuration, secrets ---------------------------------------------------------------------------


async def test_logout_url_ends_the_session_at_the_provider(provider: OidcProvider, client: OidcClient) -> None:
    async with httpx.AsyncClient(timeout=5) as browser:
        url, flow = await client.begin(REDIRECT)
        _, params = await sign_in(url, http=browser)
        assert params is not None
        _, id_token = await client.finish(flow, params)

        logout = await client.logout_url(id_token, LOGGED_OUT)
        assert logout is not None and logout.startswith(f"{provider.issuer}/session/end?")
        query = httpx.URL(logout).params
        assert (query["id_token_hint"], query["post_logout_redirect_uri"], query["client_id"]) == (
            id_token,
            LOGGED_OUT,
            "deckard",
        )
        page = await browser.get(logout)  # the provider accepts the hint and asks to confirm
        xsrf = re.search(r'name="xsrf" value="([^"]+)"', page.text)
        assert page.status_code == 200 and xsrf, page.text
        done = await browser.post(page.url.join("/session/end/confirm"), data={"xsrf": xsrf[1], "logout": "yes"})
        assert done.is_redirect and done.headers["location"].startswith(LOGGED_OUT)

        url, _ = await client.begin(REDIRECT)  # signed out there: the provider asks for the password again
        page, params = await browse(browser, await browser.get(url))
        assert params is None and 'name="password"' in page.text


async def test_logout_url_is_none_when_the_provider_has_no_end_session(provider: OidcProvider) -> None:
    no_logout = Tamper(discovery=lambda doc: {k: v for k, v in doc.items() if k != "end_session_endpoint"})
    async with oidc_client(config_for(provider), no_logout) as client:
        assert await client.logout_url("token", LOGGED_OUT) is None


def test_config_from_full_key_names() -> None:
    assert OidcConfig.from_config({}) == OidcConfig() and not OidcConfig().enabled
    config = OidcConfig.from_config(
        {
            "auth.oidc.issuer": "https://sso.example.org/realms/acme",
            "auth.oidc.client_id": "deckard",
            "auth.oidc.client_secret": "s3cret",
            "auth.oidc.scopes": "profile email groups",
            "auth.oidc.login_claim": "upn",
            "auth.oidc.timeout_s": "2.5",
        }
    )
    assert config.enabled and config.scopes == "openid profile email groups"  # openid is never left out
    assert (config.login_claim, config.groups_claim, config.timeout_s) == ("upn", "groups", 2.5)
    assert "s3cret" not in repr(config)
    with pytest.raises(ValueError):
        OidcClient(OidcConfig())


async def test_no_secret_shows_in_reprs(client: OidcClient) -> None:
    _, flow = await client.begin(REDIRECT)
    text = repr(flow) + repr(client) + repr(client.config)
    assert flow.state not in text and flow.nonce not in text and flow.code_verifier not in text
    assert SECRET not in text and REDIRECT in text
