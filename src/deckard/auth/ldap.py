"""Directory logins: the ``ldap`` password plugin, for OpenLDAP and Active Directory.

A tenant whose people live in a directory lets the directory check their passwords.  Two ways, chosen by config:

* **search-then-bind** (``auth.ldap.bind_dn`` + ``base_dn``): a service account finds the one entry that
  ``user_filter`` matches for the login (AD: ``(|(sAMAccountName={login})(userPrincipalName={login}))``), then the
  plugin binds as that entry's DN with the password.  No entry: PASS (the next plugin may know the name); more than
  one: REJECT ``ambiguous_login``, never a guess.
* **direct bind** (``auth.ldap.bind_dn_template``, ``uid={login},ou=people,...`` or AD's ``{login}@corp.example``):
  bind as the user, then read the user's own entry with that bind.  The directory cannot say whether a refused bind
  was an unknown name or a wrong password, so both REJECT ``bad_credentials`` (AD says it: ``data 525`` is PASS).

Verdicts: ACCEPT with the entry's attributes and group DNs (lower-cased) in the Identity; REJECT ``bad_credentials``
(wrong or empty password: an empty simple bind is an anonymous bind that "succeeds", so it is refused before any
traffic), ``ambiguous_login``, ``not_in_group`` (``required_group``, checked only after the password, so a refusal
tells nothing to someone without it), ``entry_not_found`` (a direct bind worked but the entry is unreadable), AD's
account states (``account_disabled``, ``account_locked``, ``password_expired``, ...) or ``bind_refused``; PASS for a
name the directory does not have.  ``AuthUnavailable`` when it cannot tell: no answer within ``timeout_s``, an
untrusted certificate, a refused service account, a failed search, an answer ldap3 cannot parse.

Escaping: ``{login}`` and ``{dn}`` are substituted in one pass, RFC 4515-escaped in filters and RFC 4514-escaped in
the DN template, so ``*``, ``)(uid=*`` or NUL match nothing and ``a,ou=x`` names no other branch.

Why the machinery below.  ldap3 is synchronous, so every login runs in a small thread pool owned by the plugin (a
slow directory then ties up its own eight threads, not the event loop's default executor that hashes argon2).
Connections stay open between logins (here a bind on an open connection takes ~0.5 ms; a new plain one ~0.2 ms more,
a new TLS one ~45 ms more, as slapd's TLS 1.3 session tickets meet Nagle and delayed ACKs): service-account
connections for searches, and anonymous ones the plugin binds as each user in turn (never used for a search in
search-then-bind mode).  Every wait on the network (connect, TLS handshake, each reply) is bounded by
``timeout_s``, a timed-out request is never retried, and ``authenticate`` gives up at ``timeout_s`` + 0.5 s even if
its turn in the pool never came.  Failover does not use ldap3's ``ServerPool``: ``active=True`` retries a dead pool
forever and ``active=N`` sleeps 10 s between rounds (``POOLING_LOOP_TIMEOUT``), both hangs; here the URLs are tried
in order, each with ``timeout_s / len(urls)`` to connect, and one that failed is tried last for 30 s.  TLS always
verifies the chain and the host name through OpenSSL (ldap3's own name check is ``ssl.match_hostname``, deprecated
and, from Python 3.12, a fallback that ignores IP addresses).

The password is passed inside ``Credentials`` (whose repr hides it), set on a connection only for its bind and
cleared after (ldap3's ``Connection.__repr__`` prints it), scrubbed from any directory message that is logged, and
ldap3's own debug log is told to hide credentials.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ldap3 import BASE, NONE, SIMPLE, SUBTREE, SYNC, Connection, Server, Tls
from ldap3.core.exceptions import LDAPCertificateError, LDAPCommunicationError, LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn
from ldap3.utils.log import set_library_log_hide_sensitive_data

from deckard.auth.chain import AuthUnavailable, Credentials, Decision, Identity
from deckard.model.errors import BadInput

log = logging.getLogger("deckard.auth.ldap")
set_library_log_hide_sensitive_data(True)  # only matters if someone turns ldap3's debug log on: it logs bind PDUs

T = TypeVar("T")
_PREFIX = "auth.ldap."
_WORKERS = 8  # threads and open connections of each kind per plugin (one plugin per tenant configuration)
_GRACE_S = 0.5  # authenticate's deadline beyond timeout_s: scheduling, and the wait for a free thread
_FAILED_FOR_S = 30.0  # a URL that failed is tried last for this long
_IDLE_FOR_S = 60.0  # a pooled connection unused this long is closed (directories and firewalls drop idle ones)
_MAX_GROUPS = 1000
_AD_BIND_CODES = {  # AD's reason for a refused bind (the "data NNN" in its message)
    "525": "",  # no such user: PASS
    "52e": "bad_credentials",
    "530": "login_restricted",  # not at this time of day
    "531": "login_restricted",  # not from this workstation
    "532": "password_expired",
    "533": "account_disabled",
    "701": "account_expired",
    "773": "password_expired",  # must change it at next login
    "775": "account_locked",
}
_BAD_NAME = {32, 34, 48, 49}  # noSuchObject, invalidDNSyntax, inappropriateAuthentication, invalidCredentials
_SERVER_TROUBLE = {3, 11, 51, 52, 80}  # timeLimitExceeded, adminLimitExceeded, busy, unavailable, other


@dataclass(frozen=True)
class LdapSettings:
    """The ``auth.ldap.*`` keys of one tenant, checked once when the plugin is built."""

    urls: tuple[str, ...]
    starttls: bool = False
    ca_file: str = ""
    bind_dn_template: str = ""
    bind_dn: str = ""
    bind_password: str = field(default="", repr=False)
    base_dn: str = ""
    user_filter: str = "(uid={login})"
    group_base_dn: str = ""
    group_filter: str = "(|(member={dn})(uniqueMember={dn})(memberUid={login}))"
    required_group: str = ""
    attr_display_name: tuple[str, ...] = ("displayName", "cn")
    attr_mail: tuple[str, ...] = ("mail",)
    attr_home: tuple[str, ...] = ("homeDirectory",)
    timeout_s: float = 3.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LdapSettings:
        """Each field from ``auth.ldap.<field>`` (``urls`` from ``auth.ldap.url``), typed like its default;
        missing keys keep the default, and an empty ``group_filter`` turns the group search off."""
        defaults, values = cls(urls=()), {}
        for f in fields(cls):
            raw = config.get(_PREFIX + ("url" if f.name == "urls" else f.name))
            if raw is not None:
                values[f.name] = _typed_like(getattr(defaults, f.name), raw, f.name)
        settings = replace(defaults, **values)
        settings.check()
        return settings

    @property
    def direct(self) -> bool:
        return bool(self.bind_dn_template)

    @property
    def template_is_dn(self) -> bool:
        return "=" in self.bind_dn_template  # else a userPrincipalName (x@corp) or down-level (CORP\x) name

    def check(self) -> None:
        if not self.urls:
            raise BadInput("auth.ldap.url is empty: set it to ldap://host:port or ldaps://host:port")
        for url in self.urls:
            if not url.lower().startswith(("ldap://", "ldaps://")):
                raise BadInput(f"auth.ldap.url: {url!r} is not an ldap:// or ldaps:// URL")
        if self.direct and "{login}" not in self.bind_dn_template:
            raise BadInput("auth.ldap.bind_dn_template must contain {login}")
        needs_search = not self.direct or not self.template_is_dn
        if needs_search and not self.base_dn:
            raise BadInput("set auth.ldap.base_dn (where people are searched) or a DN-form auth.ldap.bind_dn_template")
        if needs_search and "{login}" not in self.user_filter:
            raise BadInput("auth.ldap.user_filter must contain {login}, or every login finds the same entries")
        if self.ca_file and not Path(self.ca_file).is_file():
            raise BadInput(f"auth.ldap.ca_file: {self.ca_file} is not a file (a PEM bundle of the CAs to trust)")
        if not self.timeout_s > 0:
            raise BadInput("auth.ldap.timeout_s must be a positive number of seconds")


def _typed_like(default: object, raw: object, name: str) -> Any:
    if isinstance(default, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"} if isinstance(raw, str) else bool(raw)
    if isinstance(default, float):
        try:
            return float(str(raw))
        except ValueError:
            raise BadInput(f"auth.ldap.{name}: {raw!r} is not a number") from None
    if isinstance(default, tuple):
        return tuple(str(raw).split()) or default
    if name == "bind_password":
        return str(raw)  # a password may begin or end with a space
    return str(raw).strip() or (default if name == "user_filter" else "")


def _fill(template: str, values: Mapping[str, str]) -> str:
    """``{login}``/``{dn}`` replaced in one pass, so a value that contains ``{dn}`` is not substituted again."""
    return re.sub(r"\{(login|dn)\}", lambda m: values[m.group(1)], template)


def _escape_dn_value(value: str) -> str:
    return str(escape_rdn(value)).replace("\\\x00", "\\00")  # RFC 4514 writes NUL as \00; ldap3 leaves it raw


def normal_dn(dn: str) -> str:
    """A DN lower-cased, without the spaces people put after commas, for comparing group DNs."""
    try:
        return "".join(f"{attr}={value}{sep}" for attr, value, sep in parse_dn(dn, strip=True)).lower()
    except (LDAPException, ValueError, IndexError):
        return dn.strip().lower()


@dataclass(frozen=True)
class _Entry:
    dn: str
    values: dict[str, list[str]]  # lower-cased attribute name -> values

    @classmethod
    def from_response(cls, item: Mapping[str, Any]) -> _Entry:
        raw = item.get("raw_attributes") or {}
        values = {str(k).lower(): [bytes(v).decode("utf-8", "replace") for v in vs] for k, vs in raw.items()}
        return cls(str(item["dn"]), values)

    def first(self, names: tuple[str, ...]) -> str:
        return next((self.values[n.lower()][0] for n in names if self.values.get(n.lower())), "")


class _VerifiedTls(Tls):  # type: ignore[misc]  # ldap3 is untyped
    """ldap3's ``Tls`` with one OpenSSL context that checks the chain and the host name (IP addresses too)."""

    def __init__(self, ca_file: str) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        try:
            self.context = ssl.create_default_context(cafile=ca_file or None)  # CERT_REQUIRED, check_hostname
        except (OSError, ssl.SSLError) as exc:
            raise BadInput(f"auth.ldap.ca_file: {ca_file} is not a PEM bundle of CA certificates ({exc})") from None

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self.context.wrap_socket(
            connection.socket, server_hostname=connection.server.host, do_handshake_on_connect=do_handshake
        )


class _Servers:
    """The directory's URLs in failover order, remembering which failed lately (they are tried last)."""

    def __init__(self, settings: LdapSettings) -> None:
        needs_tls = settings.starttls or any(u.lower().startswith("ldaps://") for u in settings.urls)
        tls = _VerifiedTls(settings.ca_file) if needs_tls else None
        connect_s = settings.timeout_s / len(settings.urls)  # trying every URL fits in one timeout
        self.all = [Server(u, get_info=NONE, tls=tls, connect_timeout=connect_s) for u in settings.urls]
        self._index = {id(server): i for i, server in enumerate(self.all)}
        self._failed_at: dict[int, float] = {}
        self._lock = threading.Lock()

    def in_order(self) -> list[Any]:
        with self._lock:
            down = {i for i, at in self._failed_at.items() if time.monotonic() - at < _FAILED_FOR_S}
        return [s for i, s in enumerate(self.all) if i not in down] + [s for i, s in enumerate(self.all) if i in down]

    def failed(self, server: Any) -> None:
        with self._lock:
            self._failed_at[self._index[id(server)]] = time.monotonic()

    def failed_since(self, server: Any, since: float) -> bool:
        with self._lock:
            return self._failed_at.get(self._index[id(server)], 0.0) >= since


def _close_quietly(conn: Any) -> None:
    try:
        conn.unbind()  # sends an unbind and closes the socket; no reply to wait for
    except Exception:
        pass


@dataclass
class _Lease:
    conn: Any
    opened: float = field(default_factory=time.monotonic)
    returned: float = 0.0


class _Pool:
    """Open connections of one kind, reused newest first by the plugin's threads; closing it unbinds them all.

    A connection stays with the server it was opened on; it is dropped when it sat idle too long or when that
    server has failed since it was opened (it may be one of the connections that hang)."""

    def __init__(self, open_connection: Callable[[], Any], servers: _Servers) -> None:
        self._open = open_connection
        self._servers = servers
        self._idle: list[_Lease] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> _Lease | None:
        stale, found = [], None
        with self._lock:
            while self._idle and found is None:
                lease = self._idle.pop()
                idle_too_long = time.monotonic() - lease.returned > _IDLE_FOR_S
                if idle_too_long or lease.conn.closed or self._servers.failed_since(lease.conn.server, lease.opened):
                    stale.append(lease.conn)
                else:
                    found = lease
        for conn in stale:
            _close_quietly(conn)
        return found

    def open(self) -> _Lease:
        return _Lease(self._open())

    def give(self, lease: _Lease) -> None:
        lease.returned = time.monotonic()
        with self._lock:
            if not self._closed and len(self._idle) < _WORKERS:
                self._idle.append(lease)
                return
        _close_quietly(lease.conn)

    def close(self) -> None:
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for lease in idle:
            _close_quietly(lease.conn)


class LdapAuthenticator:
    """The ``ldap`` plugin: one per tenant configuration, shared by all of that tenant's concurrent logins."""

    name: ClassVar[str] = "ldap"

    def __init__(self, settings: LdapSettings) -> None:
        self.settings = settings
        self._servers = _Servers(settings)
        self._service = _Pool(self._open_service, self._servers)
        self._users = _Pool(self._connect, self._servers)
        self._executor = ThreadPoolExecutor(_WORKERS, thread_name_prefix="deckard-ldap")
        self._attributes = list(
            dict.fromkeys([*settings.attr_display_name, *settings.attr_mail, *settings.attr_home, "memberOf"])
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LdapAuthenticator:
        """The registry's factory."""
        return cls(LdapSettings.from_config(config))

    def __repr__(self) -> str:
        mode = "direct bind" if self.settings.direct else "search-then-bind"
        return f"LdapAuthenticator(urls={' '.join(self.settings.urls)!r}, mode={mode!r})"

    async def authenticate(self, creds: Credentials) -> Decision:
        if not creds.login or creds.login != creds.login.strip():  # LDAP matching ignores the spaces
            return Decision.pass_(self.name, "empty, or begins or ends with a space: not a directory name")
        if not creds.password:
            return Decision.reject(self.name, "bad_credentials", "empty password (a simple bind would be anonymous)")
        try:
            job = asyncio.get_running_loop().run_in_executor(self._executor, self._login, creds)
        except RuntimeError:  # the executor was shut down
            raise AuthUnavailable("the LDAP plugin is closed", details={"plugin": self.name}) from None
        try:
            return await asyncio.wait_for(job, self.settings.timeout_s + _GRACE_S)
        except TimeoutError:
            log.warning("ldap: no decision within %.1f s (%s)", self.settings.timeout_s + _GRACE_S, creds.login)
            raise AuthUnavailable("the directory did not answer", details={"plugin": self.name}) from None

    def close(self) -> None:
        """Unbind every pooled connection; logins still running unbind theirs when they end."""
        self._executor.shutdown(wait=False)  # queued logins still finish: a cancelled one would raise CancelledError
        self._service.close()
        self._users.close()

    # -- one login, in a worker thread ---------------------------------------------------------------------------

    def _login(self, creds: Credentials) -> Decision:
        try:
            return self._login_direct(creds) if self.settings.direct else self._login_search(creds)
        except AuthUnavailable:
            raise
        except Exception as exc:  # ldap3's errors, and KeyError & co. when an answer is garbled: no decision
            raise self._unavailable(exc, creds) from None

    def _login_search(self, creds: Credentials) -> Decision:
        found = self._run(self._service, lambda c: self._find_user(c, creds.login))
        if isinstance(found, Decision):
            return found
        refused = self._run(self._users, lambda c: self._bind_user(c, found.dn, creds))
        if refused:
            return refused
        groups = self._own_groups(found)
        if self._search_groups(creds):
            groups = self._run(self._service, lambda c: self._groups(c, found, creds.login))
        return self._decide(creds, found, groups)

    def _login_direct(self, creds: Credentials) -> Decision:
        bind_dn = _fill(self.settings.bind_dn_template, {"login": _escape_dn_value(creds.login), "dn": ""})

        def work(conn: Any) -> Decision:
            refused = self._bind_user(conn, bind_dn, creds)
            if refused:
                return refused
            found: _Entry | Decision | None
            if self.settings.template_is_dn:
                found = self._read_entry(conn, bind_dn)
            else:
                found = self._find_user(conn, creds.login)
            if isinstance(found, Decision) and found.code:  # ambiguous_login
                return found
            if not isinstance(found, _Entry):
                reason = f"{bind_dn} bound, but its entry could not be read (base_dn, user_filter or the ACL)"
                return self._refuse("entry_not_found", reason)
            groups = self._groups(conn, found, creds.login) if self._search_groups(creds) else self._own_groups(found)
            return self._decide(creds, found, groups)

        return self._run(self._users, work)

    def _run(self, pool: _Pool, work: Callable[[Any], T]) -> T:
        """``work`` on a pooled connection; one the directory closed while it sat idle is replaced once."""
        lease = pool.take()
        if lease is not None:
            try:
                return self._work_on(pool, lease, work)
            except LDAPCommunicationError as exc:
                if isinstance(exc, TimeoutError):
                    raise
        return self._work_on(pool, pool.open(), work)

    def _work_on(self, pool: _Pool, lease: _Lease, work: Callable[[Any], T]) -> T:
        try:
            result = work(lease.conn)
        except BaseException as exc:
            self._drop(lease.conn, exc)
            raise
        pool.give(lease)
        return result

    def _drop(self, conn: Any, exc: BaseException) -> None:
        _close_quietly(conn)
        if isinstance(exc, TimeoutError):  # the server stopped answering: prefer another URL for a while
            self._servers.failed(conn.server)

    # -- connections ----------------------------------------------------------------------------------------------

    def _connect(self) -> Any:
        """An open connection (TLS up, not bound) to the first URL that takes one."""
        failures: list[tuple[Any, Exception]] = []
        for server in self._servers.in_order():
            conn = Connection(
                server, client_strategy=SYNC, raise_exceptions=False, auto_referrals=False, read_only=True
            )
            try:
                server.reset_availability()  # ldap3 would skip an address that failed in the last 5 s, untried
                conn.open(read_server_info=False)
                conn.socket.settimeout(self.settings.timeout_s)  # ldap3's receive_timeout must be an int
                if self.settings.starttls and not server.ssl:
                    conn.start_tls(read_server_info=False)
                return conn
            except Exception as exc:
                _close_quietly(conn)
                self._servers.failed(server)
                failures.append((server, exc))
                if len(self._servers.all) > 1:
                    log.warning("ldap: %s failed (%s), trying the next URL", server.name, _describe(exc, None))
        raise self._unavailable(_pick_failure(failures), None, failures[0][0])

    def _open_service(self) -> Any:
        conn = self._connect()
        if not self.settings.bind_dn:
            return conn  # anonymous searches, where the directory allows them
        conn.user, conn.password, conn.authentication = self.settings.bind_dn, self.settings.bind_password, SIMPLE
        try:
            bound = conn.bind(read_server_info=False)
        except BaseException as exc:
            self._drop(conn, exc)
            raise
        finally:
            conn.password = None
        if not bound:
            result = conn.result or {}
            _close_quietly(conn)
            log.warning("ldap: the service account %s was refused: %s", self.settings.bind_dn, _result_text(result))
            raise AuthUnavailable("the directory refused the service account", details={"plugin": self.name})
        return conn

    # -- directory operations -----------------------------------------------------------------------------------

    def _bind_user(self, conn: Any, dn: str, creds: Credentials) -> Decision | None:
        """None when the password is right; else the refusal (or AuthUnavailable when the server is in trouble)."""
        conn.user, conn.password, conn.authentication = dn, creds.password, SIMPLE
        try:
            if conn.bind(read_server_info=False):
                return None
        finally:
            conn.password = None
        result = dict(conn.result or {})
        code, message = int(result.get("result", -1)), _scrub(str(result.get("message") or ""), creds)
        ad = re.search(r"\bdata ([0-9a-f]{3,4})\b", message)
        if ad and ad.group(1) in _AD_BIND_CODES:
            refusal = _AD_BIND_CODES[ad.group(1)]
            reason = f"the directory refused {dn}: {message}"
            return self._refuse(refusal, reason) if refusal else Decision.pass_(self.name, "not in the directory")
        if code in _BAD_NAME:
            return self._refuse("bad_credentials", f"the directory refused {dn}: {result.get('description')}")
        if code in _SERVER_TROUBLE:
            log.warning("ldap: bind for %s failed: %s", dn, _result_text(result, creds))
            raise AuthUnavailable("the directory did not answer", details={"plugin": self.name})
        return self._refuse("bind_refused", f"the directory refused {dn}: {_result_text(result, creds)}")

    def _find_user(self, conn: Any, login: str) -> _Entry | Decision:
        """The one entry ``user_filter`` matches under ``base_dn``, or PASS (none) / REJECT (several)."""
        query = _fill(self.settings.user_filter, {"login": escape_filter_chars(login), "dn": ""})
        entries, truncated = self._search(conn, self.settings.base_dn, query, SUBTREE, self._attributes, 2)
        if not entries:
            return Decision.pass_(self.name, "not in the directory")
        if len(entries) > 1 or truncated:
            reason = f"{query} matches more than one entry under {self.settings.base_dn}"
            return self._refuse("ambiguous_login", reason)
        return _Entry.from_response(entries[0])

    def _read_entry(self, conn: Any, dn: str) -> _Entry | None:
        entries, _ = self._search(conn, dn, "(objectClass=*)", BASE, self._attributes, 1)
        return _Entry.from_response(entries[0]) if entries else None

    def _search_groups(self, creds: Credentials) -> bool:
        """Whether this login needs a group search: a required group, or a caller mapping groups to roles (a
        user's desktop login needs neither, and saves a third directory request)."""
        return bool(creds.want_groups or self.settings.required_group)

    @staticmethod
    def _own_groups(entry: _Entry) -> tuple[str, ...]:
        """The groups the entry itself names (AD's ``memberOf``): no search."""
        return tuple(sorted({normal_dn(g) for g in entry.values.get("memberof", [])}))

    def _groups(self, conn: Any, entry: _Entry, login: str) -> tuple[str, ...]:
        """Group DNs from the entry's ``memberOf`` (AD) and from ``group_filter`` under the group base."""
        found = list(entry.values.get("memberof", []))
        base = self.settings.group_base_dn or self.settings.base_dn
        if base and self.settings.group_filter:
            values = {"dn": escape_filter_chars(entry.dn), "login": escape_filter_chars(login)}
            groups, truncated = self._search(conn, base, _fill(self.settings.group_filter, values), SUBTREE, ["1.1"])
            if truncated:
                log.warning("ldap: %s is in more than %d groups; the rest are ignored", entry.dn, _MAX_GROUPS)
            found += [str(g["dn"]) for g in groups]
        return tuple(sorted({normal_dn(g) for g in found}))

    def _search(
        self, conn: Any, base: str, query: str, scope: str, attributes: list[str], limit: int = _MAX_GROUPS
    ) -> tuple[list[Mapping[str, Any]], bool]:
        """Entries found (references ignored) and whether the size limit cut the answer short."""
        conn.search(base, query, scope, attributes=attributes, size_limit=limit)
        result = conn.result or {}
        code = int(result.get("result", -1))
        if code == 32 and scope == BASE:  # noSuchObject on a base search: simply not there
            return [], False
        if code not in (0, 4):  # success, sizeLimitExceeded
            log.warning("ldap: search %s under %s failed: %s", query, base, _result_text(result))
            raise AuthUnavailable("the directory refused the search", details={"plugin": self.name})
        entries = [r for r in conn.response or [] if r.get("type") == "searchResEntry"]
        return entries, code == 4

    def _decide(self, creds: Credentials, entry: _Entry, groups: tuple[str, ...]) -> Decision:
        required = self.settings.required_group
        if required and normal_dn(required) not in groups:
            return self._refuse("not_in_group", f"{entry.dn} is not a member of {required}")
        s = self.settings
        identity = Identity(
            login=creds.login.lower(),
            tenant=creds.tenant,
            plugin=self.name,
            display_name=entry.first(s.attr_display_name),
            mail=entry.first(s.attr_mail),
            home=entry.first(s.attr_home),
            groups=groups,
            external_id=entry.dn,
        )
        return Decision.accept(identity)

    def _refuse(self, code: str, reason: str) -> Decision:
        return Decision.reject(self.name, code, reason)

    def _unavailable(self, exc: Exception, creds: Credentials | None, server: Any = None) -> AuthUnavailable:
        """The error a login raises when the directory gave no usable answer; the specifics go to the log."""
        where = getattr(server, "name", "") or " ".join(self.settings.urls)
        if _is_certificate_problem(exc):
            message = "the directory's certificate was not trusted"
            hint = f"check auth.ldap.ca_file ({self.settings.ca_file or 'the system CAs'}) and the URL's host name"
        elif isinstance(exc, LDAPCommunicationError | OSError):
            message, hint = "the directory did not answer", f"timeout {self.settings.timeout_s} s"
        else:
            message, hint = "the directory gave an answer the plugin cannot use", type(exc).__name__
        unexpected = not isinstance(exc, LDAPException)  # a garbled answer, or a bug here: keep the traceback
        log.warning("ldap: %s: %s (%s): %s", where, message, hint, _describe(exc, creds), exc_info=unexpected)
        return AuthUnavailable(message, details={"plugin": self.name})


def _is_certificate_problem(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLCertVerificationError | LDAPCertificateError) or "CERTIFICATE_VERIFY" in str(exc)


def _pick_failure(failures: list[tuple[Any, Exception]]) -> Exception:
    """The failure to report when every URL failed: a certificate problem first (it needs the operator)."""
    return next((e for _, e in failures if _is_certificate_problem(e)), failures[0][1])


def _scrub(text: str, creds: Credentials | None) -> str:
    return text.replace(creds.password, "***") if creds and creds.password else text


def _describe(exc: BaseException, creds: Credentials | None) -> str:
    return _scrub(f"{type(exc).__name__}: {exc}", creds)


def _result_text(result: Mapping[str, Any], creds: Credentials | None = None) -> str:
    text = f"{result.get('result')} {result.get('description')} {result.get('message') or ''}".strip()
    return _scrub(text, creds)
