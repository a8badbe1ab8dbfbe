"""Every user login goes through here — broker (QVD Basic and Bearer), portal (password, second step, SSO) — so
every path gets the same chain, the same lockout, the same rules and the same audit record.

A password login, in order:

1. the lockout (``services/lockout.py``): a locked account or a waiting address is refused before any password
   is checked;
2. the tenant's chain (``auth.chain``, plugins in ``auth/plugins.py``): the first plugin that knows the name
   decides; a directory that does not answer is 503 ``auth_unavailable``;
3. the account: an existing user (blocked → refused), or with ``auth.auto.enabled`` a new one made from what the
   directory said, with a first desktop (QVD's Auto plugin);
4. the login rules (source networks, hours: the user's own or the tenant's);
5. the second factor, when the user enrolled or the tenant requires it: the code comes with the login (QVD's
   ``Auth-<hex>`` headers) or in a second step against a challenge (the portal).

Every decision is appended to the audit chain (``user.login``): who, how (which plugin, which factor), from
where, the result and its code.  Every failure that a guesser could time takes at least ``auth.failure_floor_ms``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.auth.chain import AuthUnavailable, Credentials, Decision, Identity, Verdict
from deckard.db import schema as t
from deckard.db.engine import Database, prepared
from deckard.model.entities import User, utcnow
from deckard.model.errors import DeckardError, PermissionDenied, Unauthenticated
from deckard.model.login_rules import LoginRules
from deckard.services import lockout, password_plugins, second_factor, tickets
from deckard.services.audit import append_audit
from deckard.services.config import read_configs
from deckard.services.personal_tokens import token_owner
from deckard.services.provisioning import provision
from deckard.services.users import split_login

log = structlog.get_logger("deckard.identity")

TIMED_CODES = frozenset({"bad_credentials", "bad_second_factor", "second_factor_replayed"})
WAIT_CODES = frozenset({"login_locked", "account_locked"})
# ``auth.lockout.refusal_delay_ms`` as last read per farm database: a refusal from memory reads no configuration
_refusal_delay_ms: dict[str, int] = {}


class SecondFactorRequired(Unauthenticated):
    """The password was right; the code of the user's authenticator app is due.  ``details.challenge`` lets the
    portal send it without the password again; QVD's clients send it in the ``Auth-746f7470`` header."""

    code = "totp_required"


class EnrolmentRequired(Unauthenticated):
    """The tenant requires a second factor and this user has none yet: enrol in the portal
    (``details.challenge`` lets the portal do it now)."""

    code = "totp_enrolment_required"


@dataclass(frozen=True)
class LoginResult:
    user: User
    plugin: str  # local | ldap | oidc | token: who decided
    factor: str = ""  # "" | totp | recovery
    # ``login_password(record_later=True)``: the success's audit record, for the caller to write (it must)
    record: Callable[[], Awaitable[None]] | None = field(default=None, compare=False)


@dataclass
class _Attempt:
    """One login as it goes: what the audit record will say."""

    db: Database
    login: str
    tenant: str
    source: str
    via: str
    method: str  # password | token | sso | challenge
    tenant_id: int | None = None
    plugin: str = ""
    factor: str = ""
    user_id: int | None = None
    started: float = 0.0
    network: str | None = None  # the desktop network, for a first desktop made at an auto-provisioning login

    async def record(self, error: DeckardError | None) -> None:
        if error is not None and error.code in WAIT_CODES:
            # a flood of tries from a waiting address is refused before any check: one audit write each would
            # let it hammer the database; the failures that started the wait are audited, and the log has these
            log.info("auth.refused_waiting", login=self.login, tenant=self.tenant, source=self.source, via=self.via)
            return
        arguments = {"via": self.via, "method": self.method, "plugin": self.plugin, "factor": self.factor}
        try:
            await append_audit(
                self.db,
                action="user.login",
                result="failed" if error else "ok",
                admin_name=f"user:{self.login}"[:64],
                tenant_id=self.tenant_id,
                object_type="user",
                object_id=str(self.user_id) if self.user_id is not None else f"{self.login}@{self.tenant}"[:64],
                arguments={k: v for k, v in arguments.items() if v},
                status=error.status if error else 200,
                error_code=error.code if error else "",
                source=self.source,
            )
        except Exception as e:  # the decision stands; a lost audit record must at least be loud
            log.error("audit.write_failed", action="user.login", exc_info=e)


# ---- the chain's plugins (built once per tenant configuration: services/password_plugins.py) -------------------


async def _run_chain(attempt: _Attempt, config: Mapping[str, Any], creds: Credentials) -> Decision:
    decision = Decision.pass_("none")
    for name in str(config["auth.chain"]).split(","):
        attempt.plugin = name
        built = password_plugins.plugin(attempt.db, attempt.tenant_id, name, config)
        decision = await built.authenticate(creds)
        if decision.verdict != Verdict.PASS:
            break
    return decision


async def _run_chain_waiting(
    attempt: _Attempt, config: Mapping[str, Any], creds: Credentials, waiting: Callable[[], None]
) -> Decision:
    """:func:`_run_chain`, calling ``waiting`` once it turns out to wait (a chain decided in its first step, as
    for a password confirmed a moment ago, never calls it)."""
    chain = asyncio.ensure_future(_run_chain(attempt, config, creds))
    try:
        await asyncio.sleep(0)  # the chain's first step runs
    except BaseException:
        chain.cancel()
        raise
    if not chain.done():
        waiting()
    return await chain


# ---- steps ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Known:
    """What one read connection learns before any password is checked."""

    tenant_id: int | None
    tenant_blocked: bool
    row: Any  # the users row of the login as typed (with ``tenant_blocked``), or None
    enrolled: bool  # the user has a confirmed second factor
    config: dict[str, Any]
    counted: frozenset[str]  # the login's lockout counters that hold failures (``lockout.check``)

    @property
    def counters(self) -> bool:
        """Counters a success must clear (the account's, the pair's)."""
        return bool(self.counted & {"pair", "account"})


_sf = t.second_factors
_ACCOUNT = prepared(  # built once: every login reads it (services/config.py says why)
    sa.select(
        t.tenants.c.id.label("tid"),
        t.tenants.c.blocked.label("tenant_blocked"),
        t.users,
        _sf.c.confirmed_at.label("factor_confirmed_at"),
    )
    .select_from(
        t.tenants.outerjoin(
            t.users, (t.users.c.tenant_id == t.tenants.c.id) & (t.users.c.login == sa.bindparam("login"))
        ).outerjoin(_sf, (_sf.c.principal == "user") & (_sf.c.principal_id == t.users.c.id))
    )
    .where(t.tenants.c.name == sa.bindparam("tenant"))
)


async def _look_up(db: Database, login: str, tenant: str, keys: lockout.Keys) -> _Known:
    """Tenant, account, second factor, the tenant's ``auth.*`` configuration and the lockout, in one connection:
    a login's reads cost one pool checkout instead of seven.  Raises the lockout's refusal."""
    lockout.precheck(db, keys)

    async def reads(conn: AsyncConnection) -> tuple[Any, int | None, frozenset[str], dict[str, Any]]:
        found = (await conn.execute(_ACCOUNT, {"login": login, "tenant": tenant})).first()
        tenant_id = int(found.tid) if found is not None else None
        counted = await lockout.check(db, conn, replace(keys, tenant_id=tenant_id))
        return found, tenant_id, counted, await read_configs(conn, "auth.", tenant_id)

    found, tenant_id, counted, config = await db.read(reads)
    _refusal_delay_ms[db.url] = int(config["auth.lockout.refusal_delay_ms"])
    row = found if found is not None and found.id is not None else None
    return _Known(
        tenant_id,
        bool(found.tenant_blocked) if found is not None else False,
        row,
        row is not None and row.factor_confirmed_at is not None,
        config,
        counted,
    )


async def _config(db: Database, tenant_id: int | None) -> dict[str, Any]:
    async with db.connect() as conn:
        return await read_configs(conn, "auth.", tenant_id)


def _user_query() -> sa.Select[Any]:
    return sa.select(t.users, t.tenants.c.blocked.label("tenant_blocked")).join(
        t.tenants, t.tenants.c.id == t.users.c.tenant_id
    )


async def _user_row(db: Database, tenant_id: int, login: str) -> Any:
    async with db.connect() as conn:
        q = _user_query().where(t.users.c.tenant_id == tenant_id, t.users.c.login == login)
        return (await conn.execute(q)).first()


async def _learn(db: Database, row: Any, identity: Identity) -> None:
    """Keep what the directory or SSO said of the person (display name, mail, where they come from)."""
    values = {"display_name": identity.display_name[:128], "mail": identity.mail[:254]}
    if identity.external_id:
        values["external_id"] = identity.external_id[:255]
    if any(getattr(row, k) != v for k, v in values.items()):
        async with db.begin() as conn:
            await conn.execute(sa.update(t.users).where(t.users.c.id == row.id).values(**values))


async def _account(
    attempt: _Attempt, identity: Identity, config: Mapping[str, Any], known: Any = None
) -> tuple[User, Any]:
    """The Deckard user for an accepted identity: existing (``known``: its row, already read), or made now if the
    tenant auto-provisions."""
    assert attempt.tenant_id is not None
    if known is not None and known.login == identity.login:
        row = known
    else:
        row = await _user_row(attempt.db, attempt.tenant_id, identity.login)
    if row is None and identity.plugin != "local":
        if not config["auth.auto.enabled"]:
            raise PermissionDenied(
                "your directory account has no desktop account here: ask your administrator to create it",
                code="user_not_provisioned",
            )
        if attempt.network is None:
            raise PermissionDenied(
                "this login path cannot create accounts: log in through the portal", code="user_not_provisioned"
            )
        await provision(attempt.db, attempt.tenant_id, identity, config, network=attempt.network)
        row = await _user_row(attempt.db, attempt.tenant_id, identity.login)
    if row is None:
        raise Unauthenticated("wrong user name or password", code="bad_credentials")
    attempt.user_id = int(row.id)
    if row.blocked or row.tenant_blocked:
        raise Unauthenticated("this user is blocked: ask your administrator", code="user_blocked")
    if identity.plugin != "local":
        await _learn(attempt.db, row, identity)
    return User.from_row(row._mapping), row


def _rules_refusal(row: Any, config: Mapping[str, Any], source: str) -> tuple[str, str] | None:
    rules = LoginRules(
        networks=row.allowed_networks or config["auth.rules.networks"],
        hours=row.allowed_hours or config["auth.rules.hours"],
        timezone=config["auth.rules.timezone"],
    )
    return rules.refusal(source, utcnow())


def _check_rules(row: Any, config: Mapping[str, Any], source: str) -> None:
    refusal = _rules_refusal(row, config, source)
    if refusal is not None:
        raise PermissionDenied(refusal[1], code=refusal[0])


def _only_password_left(known: _Known, source: str) -> bool:
    """The look-up shows nothing that would refuse this login or ask a second step of it: only the password is
    left to check (``login_password``'s ``on_known``).  Not after any failure counted against the account, the
    address or the pair: a guesser's first wrong password ends the head starts until a login succeeds."""
    row, config = known.row, known.config
    if row is None or known.tenant_id is None or known.tenant_blocked or row.blocked or known.counted:
        return False
    if known.enrolled or config["auth.totp.required"]:
        return False
    return _rules_refusal(row, config, source) is None


async def _second_factor(
    attempt: _Attempt, user: User, config: Mapping[str, Any], factors: Mapping[str, str] | None, enrolled: bool
) -> None:
    """Check the code when one is due; without one, hand out a challenge for the second step."""
    if not enrolled and not config["auth.totp.required"]:
        return
    code = (factors or {}).get("totp", "").strip()
    if not code:
        challenge, expires = await tickets.issue_challenge(attempt.db, user)
        details = {"challenge": challenge, "expires_at": expires.isoformat()}
        if not enrolled:
            raise EnrolmentRequired(
                "your organisation requires a second factor: enrol your authenticator app in the portal",
                details=details,
            )
        raise SecondFactorRequired(
            "type the current 6-digit code of your authenticator app (or a recovery code)", details=details
        )
    if not enrolled:
        raise EnrolmentRequired(
            "your organisation requires a second factor: enrol your authenticator app in the portal"
        )
    attempt.factor = await second_factor.verify(attempt.db, "user", user.id, code)


async def _pad(attempt: _Attempt, config: Mapping[str, Any] | None, error: DeckardError) -> None:
    """Failures a guesser could time all take at least the floor; a refusal of someone who must wait takes a
    few seconds, so a client that ignores ``Retry-After`` cannot spin on the broker (it costs a sleeping task)."""
    if error.code in WAIT_CODES:
        delay_ms = (
            int(config["auth.lockout.refusal_delay_ms"]) if config else _refusal_delay_ms.get(attempt.db.url, 3000)
        )
        await asyncio.sleep(max(0.0, delay_ms / 1000 - (time.monotonic() - attempt.started)))
        return
    if error.code not in TIMED_CODES:
        return
    floor_ms = int(config["auth.failure_floor_ms"]) if config else 250
    left = floor_ms / 1000 - (time.monotonic() - attempt.started)
    if left > 0:
        await asyncio.sleep(left)


# ---- the logins -----------------------------------------------------------------------------------------------


async def login_password(
    db: Database,
    full_login: str,
    password: str,
    *,
    source: str = "",
    via: str = "broker",
    factors: Mapping[str, str] | None = None,
    network: str | None = None,
    on_known: Callable[[int], None] | None = None,
    record_later: bool = False,
) -> LoginResult:
    """A name (``user``, ``user@tenant``, ``user#tenant``) and password through the tenant's chain.  ``factors``
    carries a second-factor code (``{"totp": "123456"}``) when the client sends it with the login; ``network``
    is the desktop network, needed to give an auto-provisioned user a first desktop.  ``on_known`` is called
    with the account's user id while a password check that has to wait is running (argon2 in a thread, a
    directory's answer; not one confirmed a moment ago), when nothing else could refuse the login: the broker's
    head start (``sessions.head_start``), which its caller undoes if the login fails.  ``record_later``: a success's
    audit record is the result's ``record`` for the caller to write once it has asked for what is urgent (the
    broker: a desktop's start); a refusal's is written at once."""
    login, tenant = split_login(full_login.strip().lower())
    attempt = _Attempt(db, login, tenant, source, via, "password", started=time.monotonic(), network=network)
    config: dict[str, Any] | None = None
    keys = lockout.Keys.for_user(login, tenant, None, source)
    try:
        known = await _look_up(db, login, tenant, keys)
        attempt.tenant_id, config = known.tenant_id, known.config
        keys = replace(keys, tenant_id=known.tenant_id)
        stored = known.row.password_hash if known.row is not None else None
        creds = Credentials(login, tenant, password, source, via, stored or None)
        if known.tenant_id is None:  # no such tenant: the same work as a wrong password, the same answer
            await _run_chain(attempt, {**config, "auth.chain": "local"}, creds)
            decision = Decision.reject("local")
        elif on_known is not None and _only_password_left(known, source):
            user_id = int(known.row.id)
            decision = await _run_chain_waiting(attempt, config, creds, lambda: on_known(user_id))
        else:
            decision = await _run_chain(attempt, config, creds)
        if decision.verdict != Verdict.ACCEPT or decision.identity is None:
            await lockout.failed_attempt(db, keys)
            raise Unauthenticated("wrong user name or password", code="bad_credentials")
        user, row = await _account(attempt, decision.identity, config, known.row)
        if known.tenant_blocked:
            raise Unauthenticated("this user is blocked: ask your administrator", code="user_blocked")
        _check_rules(row, config, source)
        enrolled = known.enrolled if row is known.row else (await second_factor.status(db, "user", user.id))["enrolled"]
        try:
            await _second_factor(attempt, user, config, factors, bool(enrolled))
        except Unauthenticated as e:
            if e.code in TIMED_CODES:
                await lockout.failed_attempt(db, keys)
            raise
        if known.counters:
            await lockout.succeeded(db, keys)
    except AuthUnavailable as e:
        log.warning("auth.unavailable", tenant=tenant, plugin=attempt.plugin, reason=e.message)
        await attempt.record(e)
        raise
    except DeckardError as e:
        await attempt.record(e)
        await _pad(attempt, config, e)
        raise
    if record_later:
        return LoginResult(user, attempt.plugin, attempt.factor, record=lambda: attempt.record(None))
    await attempt.record(None)
    return LoginResult(user, attempt.plugin, attempt.factor)


async def login_challenge(
    db: Database, challenge: str, code: str, *, source: str = "", via: str = "portal"
) -> LoginResult:
    """The second step: the code for a challenge a password login handed out; the challenge ends on success."""
    user = await tickets.challenge_user(db, challenge)
    async with db.connect() as conn:
        tenant = (await conn.execute(sa.select(t.tenants.c.name).where(t.tenants.c.id == user.tenant_id))).scalar_one()
    attempt = _Attempt(db, user.login, str(tenant), source, via, "challenge", user.tenant_id, "", "", user.id)
    attempt.started = time.monotonic()
    keys = lockout.Keys.for_user(user.login, str(tenant), user.tenant_id, source)
    config: dict[str, Any] | None = None
    try:
        await lockout.begin_attempt(db, keys)
        config = await _config(db, user.tenant_id)
        try:
            attempt.factor = await second_factor.verify(db, "user", user.id, code)
        except Unauthenticated as e:
            if e.code in TIMED_CODES:
                await lockout.failed_attempt(db, keys)
            raise
        await lockout.succeeded(db, keys)
    except DeckardError as e:
        await attempt.record(e)
        await _pad(attempt, config, e)
        raise
    await tickets.end_challenge(db, challenge)
    await attempt.record(None)
    return LoginResult(user, "challenge", attempt.factor)


async def login_token(db: Database, token: str, *, source: str = "", via: str = "broker") -> LoginResult:
    """A personal token (QVD's ``Authorization: Bearer``): valid, not revoked, not expired, and its user may log
    in from here now.  A token was made after a full login, so it needs no second factor."""
    attempt = _Attempt(db, "", "", source, via, "token", started=time.monotonic())
    try:
        row = await token_owner(db, token)
        attempt.login, attempt.user_id, attempt.tenant_id = str(row.login), int(row.id), int(row.tenant_id)
        attempt.plugin = "token"
        if row.blocked or row.tenant_blocked:
            raise Unauthenticated("this user is blocked: ask your administrator", code="user_blocked")
        _check_rules(row, await _config(db, attempt.tenant_id), source)
    except DeckardError as e:
        await attempt.record(e)
        raise
    await attempt.record(None)
    return LoginResult(User.from_row(row._mapping), "token")


async def start_challenge_enrolment(db: Database, challenge: str) -> dict[str, str]:
    """Enrolment inside a login (the tenant requires a second factor and this user has none): ``{"secret",
    "uri"}`` for the challenge's user."""
    user = await tickets.challenge_user(db, challenge)
    account, issuer = await totp_account(db, user)
    return await second_factor.start_enrolment(db, "user", user.id, account, issuer)


async def login_enrolment(
    db: Database, challenge: str, code: str, *, source: str = "", via: str = "portal"
) -> tuple[LoginResult, list[str]]:
    """Confirm that enrolment with the app's first code: the login completes → (result, recovery codes to show
    once).  Audited as a login whose factor is ``totp``."""
    user = await tickets.challenge_user(db, challenge)
    account, _issuer = await totp_account(db, user)
    attempt = _Attempt(
        db, user.login, account.rpartition("@")[2], source, via, "enrolment", user.tenant_id, "", "totp", user.id
    )
    try:
        codes = await second_factor.confirm_enrolment(db, "user", user.id, code)
    except DeckardError as e:
        await attempt.record(e)
        raise
    await tickets.end_challenge(db, challenge)
    await attempt.record(None)
    return LoginResult(user, "challenge", "totp"), codes


async def totp_account(db: Database, user: User) -> tuple[str, str]:
    """What an authenticator app shows for the user: (``login@tenant``, the tenant's ``auth.totp.issuer``)."""
    async with db.connect() as conn:
        tenant = (await conn.execute(sa.select(t.tenants.c.name).where(t.tenants.c.id == user.tenant_id))).scalar_one()
        issuer = (await read_configs(conn, "auth.totp.", user.tenant_id))["auth.totp.issuer"]
    return f"{user.login}@{tenant}", str(issuer)


async def login_external(
    db: Database, tenant: str, who: Identity, *, source: str = "", via: str = "portal", network: str | None = None
) -> LoginResult:
    """A person a single sign-on provider vouched for (``who.plugin`` = ``oidc``): the same account, rules and
    audit steps as a password login.  The provider's own second factor applies; Deckard's TOTP is for passwords."""
    attempt = _Attempt(db, who.login, tenant, source, via, "sso", plugin=who.plugin, network=network)
    try:
        known = await _look_up(db, who.login, tenant, lockout.Keys.for_user(who.login, tenant, None, source))
        attempt.tenant_id, config = known.tenant_id, known.config
        if attempt.tenant_id is None:
            raise Unauthenticated(f"no tenant {tenant[:64]!r}", code="bad_credentials")
        user, row = await _account(attempt, replace(who, tenant=tenant), config, known.row)
        if known.tenant_blocked:
            raise Unauthenticated("this user is blocked: ask your administrator", code="user_blocked")
        _check_rules(row, config, source)
    except DeckardError as e:
        await attempt.record(e)
        raise
    await attempt.record(None)
    return LoginResult(user, who.plugin)
