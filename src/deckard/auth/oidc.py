"""Single sign-on with an OpenID provider: the relying party's half of the authorization code flow with PKCE.

The user portal and the admin web UI call :meth:`OidcClient.begin` to send the person's browser to the provider,
keep the returned :class:`Flow` server-side (keyed by a hash of its ``state``), and hand the callback's query
parameters to :meth:`OidcClient.finish`, which exchanges the code for an ID token and returns the
:class:`~deckard.auth.chain.Identity` the token vouches for.  Nothing is stored here; one client per tenant
configuration is built once and reused, caching the provider's discovery document and keys for a few minutes.

Every refusal is an ``Unauthenticated`` with its own stable code (``sso_denied``, ``sso_bad_state``,
``sso_bad_request``, ``sso_expired``, ``sso_token_refused``, ``sso_bad_token``, ``sso_bad_nonce``,
``sso_no_login_claim``); a provider that does not answer in ``auth.oidc.timeout_s`` (or answers 5xx, or garbage)
is ``AuthUnavailable``, a 503 the person can retry.  The ID token is trusted only when it is signed with an
asymmetric algorithm the provider advertises, by a key of the provider's JWKS: never ``none``, never HS* (whose
key would be the client secret, which the portal itself holds).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import secrets
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote_plus

import httpx
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

from deckard.auth.chain import AuthUnavailable, Identity
from deckard.model.errors import BadInput, Unauthenticated

FLOW_LIFETIME_S = 600  # a person who has not come back from the provider in 10 minutes starts again
METADATA_TTL_S = 300  # discovery and JWKS are fetched again after 5 minutes
LEEWAY_S = 60  # clock skew tolerated between Deckard and the provider
# asymmetric signature algorithms (RFC 7518, RFC 8037, RFC 9864): an HS* ID token would be keyed by the client secret
ASYMMETRIC_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519"}
)


@dataclass(frozen=True)
class OidcConfig:
    """A tenant's ``auth.oidc.*`` settings."""

    issuer: str = ""
    client_id: str = ""
    client_secret: str = field(default="", repr=False)  # "": a public client, proved by PKCE alone
    scopes: str = "openid profile email"
    login_claim: str = "preferred_username"
    groups_claim: str = "groups"
    ca_file: str = ""  # PEM bundle that signs the provider's TLS certificate; "": the system's
    timeout_s: float = 5.0

    @property
    def enabled(self) -> bool:
        return bool(self.issuer and self.client_id)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> OidcConfig:
        def text(key: str, default: str) -> str:
            return str(config.get(f"auth.oidc.{key}", default) or default).strip()

        raw_scopes = config.get("auth.oidc.scopes") or cls.scopes
        scopes = [str(s) for s in raw_scopes] if isinstance(raw_scopes, list | tuple) else str(raw_scopes).split()
        if "openid" not in scopes:  # without it the provider answers plain OAuth, with no ID token
            scopes.insert(0, "openid")
        return cls(
            issuer=text("issuer", ""),
            client_id=text("client_id", ""),
            client_secret=str(config.get("auth.oidc.client_secret", "") or ""),
            scopes=" ".join(scopes),
            login_claim=text("login_claim", cls.login_claim),
            groups_claim=text("groups_claim", cls.groups_claim),
            ca_file=text("ca_file", ""),
            timeout_s=float(config.get("auth.oidc.timeout_s", cls.timeout_s) or cls.timeout_s),
        )


@dataclass(frozen=True)
class Flow:
    """One sign-in in progress, kept server-side by the caller between ``begin`` and ``finish``."""

    state: str = field(repr=False)
    nonce: str = field(repr=False)
    code_verifier: str = field(repr=False)
    redirect_uri: str
    created_at: float  # wall-clock seconds, so a flow stored by one process can be finished by another


@dataclass(frozen=True)
class _Metadata:
    """What discovery says, and the keys, as fetched at ``fetched_at`` (monotonic seconds)."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    end_session_endpoint: str | None
    auth_methods: tuple[str, ...]
    id_token_algs: tuple[str, ...]
    iss_parameter: bool  # RFC 9207: the provider names itself in the callback
    keys: KeySet
    fetched_at: float


def _refuse(code: str, message: str) -> Unauthenticated:
    return Unauthenticated(message, code=code)


def _clip(value: object, limit: int = 200) -> str:
    text = "".join(c if c.isprintable() else " " for c in str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


class OidcClient:
    """The OpenID Connect relying party for one provider and one client registration.

    ``transport`` replaces httpx's network transport (tests use it to tamper with what the provider says).
    """

    def __init__(self, config: OidcConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not config.enabled:
            raise ValueError("auth.oidc.issuer and auth.oidc.client_id must both be set")
        self.config = config
        verify: ssl.SSLContext | bool = True
        if config.ca_file:
            try:
                verify = ssl.create_default_context(cafile=config.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise BadInput(
                    f"auth.oidc.ca_file {config.ca_file!r} is not a readable PEM file ({exc}); fix the path",
                    code="sso_bad_ca_file",
                ) from None
        self._http = httpx.AsyncClient(
            timeout=config.timeout_s, verify=verify, transport=transport, follow_redirects=False
        )
        self._metadata: _Metadata | None = None
        self._fetching: asyncio.Future[_Metadata] | None = None

    def __repr__(self) -> str:
        return f"OidcClient(issuer={self.config.issuer!r}, client_id={self.config.client_id!r})"

    async def aclose(self) -> None:
        if self._fetching is not None:
            self._fetching.cancel()
        await self._http.aclose()

    async def begin(self, redirect_uri: str) -> tuple[str, Flow]:
        """The URL to send the browser to, and the flow to keep until the provider sends it back."""
        meta = await self._provider()
        flow = Flow(
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            code_verifier=secrets.token_urlsafe(48),  # 64 characters, within RFC 7636's 43..128
            redirect_uri=redirect_uri,
            created_at=time.time(),
        )
        params = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": redirect_uri,
            "scope": self.config.scopes,
            "state": flow.state,
            "nonce": flow.nonce,
            "code_challenge": create_s256_code_challenge(flow.code_verifier),
            "code_challenge_method": "S256",
        }
        return str(httpx.URL(meta.authorization_endpoint).copy_merge_params(params)), flow

    async def finish(self, flow: Flow, params: Mapping[str, str]) -> tuple[Identity, str]:
        """Check the callback, redeem its code, and return who the ID token names, with the token (for logout)."""
        if params.get("error"):
            description = params.get("error_description") or "no reason given"
            raise _refuse(
                "sso_denied",
                f"the single sign-on provider refused the sign-in ({_clip(params['error'], 64)}: "
                f"{_clip(description)}); sign in again, or ask an administrator",
            )
        state = params.get("state", "")
        if not state or not hmac.compare_digest(state.encode(), flow.state.encode()):
            raise _refuse("sso_bad_state", "this sign-in answer does not belong to this browser's sign-in; start again")
        if time.time() - flow.created_at > FLOW_LIFETIME_S:
            raise _refuse("sso_expired", "the sign-in took more than 10 minutes; start again")
        code = params.get("code")
        if not code:
            raise _refuse("sso_bad_request", "the single sign-on provider sent no authorization code; start again")
        meta = await self._provider()
        # RFC 9207: refuse an answer that another provider sent here (a mix-up attack)
        if ("iss" in params or meta.iss_parameter) and params.get("iss") != meta.issuer:
            raise _refuse("sso_bad_request", "the sign-in answer names another provider; start again")

        tokens = await self._redeem(meta, flow, code)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise _refuse("sso_bad_token", "the single sign-on provider returned no ID token")
        claims = await self._validate_id_token(id_token, flow.nonce)
        return self._identity(claims), id_token

    async def logout_url(self, id_token_hint: str, post_logout_redirect_uri: str) -> str | None:
        """Where to send the browser to sign out at the provider too (RP-initiated logout), or None."""
        meta = await self._provider()
        if not meta.end_session_endpoint:
            return None
        params = {"post_logout_redirect_uri": post_logout_redirect_uri, "client_id": self.config.client_id}
        if id_token_hint:
            params["id_token_hint"] = id_token_hint
        return str(httpx.URL(meta.end_session_endpoint).copy_merge_params(params))

    # -- the provider's metadata and keys ----------------------------------------------------------------------------

    async def _provider(self, *, refresh_keys: bool = False) -> _Metadata:
        """The cached metadata, fetched again when stale (or only the keys, on ``refresh_keys``).  Concurrent
        callers share one fetch, so a provider that hangs costs each sign-in one timeout, not one per caller."""
        meta = self._metadata
        if meta is not None and not refresh_keys and time.monotonic() - meta.fetched_at <= METADATA_TTL_S:
            return meta
        if self._fetching is None:
            self._fetching = asyncio.ensure_future(self._fetch(meta, refresh_keys))
            self._fetching.add_done_callback(self._fetched)
        return await asyncio.shield(self._fetching)

    async def _fetch(self, meta: _Metadata | None, keys_only: bool) -> _Metadata:
        if meta is not None and keys_only and time.monotonic() - meta.fetched_at <= METADATA_TTL_S:
            meta = replace(meta, keys=await self._fetch_keys(meta.jwks_uri))
        else:
            meta = await self._discover()
        self._metadata = meta
        return meta

    def _fetched(self, task: asyncio.Future[_Metadata]) -> None:
        if self._fetching is task:
            self._fetching = None
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter was cancelled

    async def _discover(self) -> _Metadata:
        url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = await self._get_json(url)
        try:
            issuer = doc["issuer"]
            endpoints = [doc["authorization_endpoint"], doc["token_endpoint"], doc["jwks_uri"]]
            end_session = doc.get("end_session_endpoint")
            auth_methods = tuple(doc.get("token_endpoint_auth_methods_supported", ["client_secret_basic"]))
            algs = tuple(doc.get("id_token_signing_alg_values_supported", ["RS256"]))
        except (KeyError, TypeError, AttributeError) as exc:
            raise _unavailable(f"the discovery document lacks {exc}") from None
        if not all(isinstance(v, str) and v for v in [issuer, *endpoints]) or not isinstance(end_session, str | None):
            raise _unavailable("the discovery document has endpoints that are not URLs")
        if issuer.rstrip("/") != self.config.issuer.rstrip("/"):
            raise _unavailable(f"the discovery document names issuer {_clip(issuer, 100)}, not auth.oidc.issuer")
        authorization_endpoint, token_endpoint, jwks_uri = endpoints
        return _Metadata(
            issuer=issuer,
            authorization_endpoint=authorization_endpoint,
            token_endpoint=token_endpoint,
            jwks_uri=jwks_uri,
            end_session_endpoint=end_session or None,
            auth_methods=tuple(str(m) for m in auth_methods),
            id_token_algs=tuple(str(a) for a in algs if a in ASYMMETRIC_ALGS),
            iss_parameter=doc.get("authorization_response_iss_parameter_supported") is True,
            keys=await self._fetch_keys(jwks_uri),
            fetched_at=time.monotonic(),
        )

    async def _fetch_keys(self, jwks_uri: str) -> KeySet:
        doc = await self._get_json(jwks_uri)
        try:
            return KeySet.import_key_set(doc)  # type: ignore[arg-type]  # checked by import_key_set
        except (JoseError, KeyError, TypeError, ValueError) as exc:
            raise _unavailable(f"the provider's JWKS cannot be read ({type(exc).__name__})") from None

    async def _get_json(self, url: str) -> dict[str, Any]:
        response = await self._request("GET", url)
        if response.status_code != 200:
            raise _unavailable(f"GET {url} answered {response.status_code}")
        return _json_object(response, url)

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request, bounded as a whole by the timeout (httpx bounds each read, not a slowly dripping answer)."""
        try:
            async with asyncio.timeout(self.config.timeout_s):
                response = await self._http.request(method, url, **kwargs)
        except TimeoutError:
            raise _unavailable(f"{method} {url} took more than {self.config.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise _unavailable(f"{method} {url} failed: {type(exc).__name__}: {_clip(exc, 160)}") from None
        if response.status_code >= 500:
            raise _unavailable(f"{method} {url} answered {response.status_code}")
        return response

    # -- the code and the ID token -------------------------------------------------------------------------------

    async def _redeem(self, meta: _Metadata, flow: Flow, code: str) -> dict[str, Any]:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": flow.redirect_uri,
            "code_verifier": flow.code_verifier,
        }
        headers = {"Accept": "application/json"}
        secret = self.config.client_secret
        if not secret:
            form["client_id"] = self.config.client_id
        elif "client_secret_basic" not in meta.auth_methods and "client_secret_post" in meta.auth_methods:
            form |= {"client_id": self.config.client_id, "client_secret": secret}
        else:  # RFC 6749 §2.3.1: both halves form-encoded before base64
            pair = f"{quote_plus(self.config.client_id)}:{quote_plus(secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        response = await self._request("POST", meta.token_endpoint, data=form, headers=headers)
        if response.status_code != 200:
            try:
                body = response.json()
                reason = f"{_clip(body.get('error'), 64)}: {_clip(body.get('error_description') or '')}"
            except (ValueError, AttributeError):
                reason = f"HTTP {response.status_code}"
            raise _refuse(
                "sso_token_refused",
                f"the single sign-on provider would not redeem the sign-in ({reason}); sign in again",
            )
        return _json_object(response, meta.token_endpoint)

    async def _validate_id_token(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims once its signature, issuer, audience, times and nonce hold (OIDC Core §3.1.3.7)."""
        meta = await self._provider()
        if not meta.id_token_algs:
            raise _refuse("sso_bad_token", "the single sign-on provider advertises no asymmetric ID token algorithm")
        try:
            try:
                token = jwt.decode(id_token, meta.keys, algorithms=meta.id_token_algs)
            except InvalidKeyIdError:  # the provider may have rotated its keys since they were fetched
                meta = await self._provider(refresh_keys=True)
                token = jwt.decode(id_token, meta.keys, algorithms=meta.id_token_algs)
            claims = token.claims
            jwt.JWTClaimsRegistry(
                leeway=LEEWAY_S,
                iss={"essential": True, "value": meta.issuer},
                sub={"essential": True},
                aud={"essential": True, "value": self.config.client_id},
                exp={"essential": True},
                iat={"essential": True},
            ).validate(claims)
        except (JoseError, ValueError) as exc:
            raise _refuse("sso_bad_token", f"the ID token is not valid ({_describe(exc)}); sign in again") from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if ("azp" in claims or len(audiences) > 1) and claims.get("azp") != self.config.client_id:
            raise _refuse("sso_bad_token", "the ID token was issued to another party (azp); sign in again")
        token_nonce = claims.get("nonce")
        if not isinstance(token_nonce, str) or not hmac.compare_digest(token_nonce.encode(), nonce.encode()):
            raise _refuse("sso_bad_nonce", "the ID token belongs to another sign-in (nonce); start again")
        return claims

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        login = claims.get(self.config.login_claim)
        if not isinstance(login, str) or not login.strip():
            raise _refuse(
                "sso_no_login_claim",
                f"the single sign-on provider did not say who you are (no {self.config.login_claim!r} claim); "
                "ask an administrator to check auth.oidc.login_claim",
            )
        groups = claims.get(self.config.groups_claim)
        if isinstance(groups, str):
            groups = [groups]
        return Identity(
            login=login.strip().lower(),
            tenant="",
            plugin="oidc",
            display_name=_text(claims.get("name")),
            mail=_text(claims.get("email")),
            groups=tuple(g for g in groups if isinstance(g, str)) if isinstance(groups, list) else (),
            external_id=f"{claims['iss']}|{claims['sub']}",
        )


def _json_object(response: httpx.Response, url: str) -> dict[str, Any]:
    try:
        doc = response.json()
    except ValueError:
        raise _unavailable(f"{url} did not answer JSON") from None
    if not isinstance(doc, dict):
        raise _unavailable(f"{url} did not answer a JSON object")
    return doc


def _unavailable(reason: str) -> AuthUnavailable:
    return AuthUnavailable("the single sign-on provider did not answer", details={"reason": reason})


def _describe(exc: Exception) -> str:
    """joserfc's reason (``Invalid claim: 'aud'``, ``bad_signature``), fit for a message."""
    reason = getattr(exc, "description", "") or str(getattr(exc, "error", "")).replace("_", " ")
    return _clip(reason or str(exc) or type(exc).__name__, 120)


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""
