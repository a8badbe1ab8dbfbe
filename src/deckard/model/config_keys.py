"""Every configuration key a farm reads from the database, with its type, default and meaning.

Why a catalogue: QVD had ~330 keys in a properties file and no way to tell a typo from a key; here an unknown key
or a value of the wrong type is refused when it is set, ``deckard config get`` can show every key with its
default, and ``docs/admin-plane.md`` documents the same list.  Values are resolved in layers (built-in default →
global row → tenant row); ``per_tenant`` says whether the last layer applies to a key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deckard.model.egress import parse_forbidden, parse_policy
from deckard.model.errors import BadInput, pick
from deckard.model.guest_metadata import check_user_data
from deckard.model.ids import parse_int
from deckard.model.login_rules import parse_hours, parse_networks, parse_timezone
from deckard.model.placement import PLACERS

_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")


@dataclass(frozen=True)
class ConfigKey:
    name: str
    type: type  # bool | int | float | str
    default: Any
    description: str
    per_tenant: bool = False
    minimum: float | None = None
    maximum: float | None = None  # numeric keys have both bounds (tests/unit/test_model.py checks it)
    pattern: str | None = None  # text keys: the whole value must match (the description names the forms)
    check: Callable[[str], object] | None = None  # text keys: raises BadInput (with its own message) if not valid
    secret: bool = False  # never shown back (``deckard config get`` prints ``***``) nor written to the audit log
    per_osf: bool = False  # may also differ per OSF, over the tenant's value (implies per_tenant)

    def __post_init__(self) -> None:
        if self.per_osf and not self.per_tenant:
            object.__setattr__(self, "per_tenant", True)


PLUGIN = "local|ldap"

# authentication (services/identity.py, docs/authentication.md): every key may differ per tenant
IDENTITY_KEYS = (
    ConfigKey(
        "auth.chain",
        str,
        "local",
        "Password plugins asked in order, comma-separated: `local` (Deckard's own passwords), `ldap` (the "
        "directory). The first that knows the name decides.",
        pattern=f"({PLUGIN})(,({PLUGIN}))*",
        per_tenant=True,
    ),
    ConfigKey(
        "auth.local.remember_s",
        int,
        300,
        "For this long after a user's local password was checked, the same password is confirmed again without "
        "argon2 (a MAC kept in the broker's memory; a changed password is never confirmed so). 0: check every time.",
        minimum=0,
        maximum=3600,
        per_tenant=True,
    ),
    ConfigKey(
        "auth.failure_floor_ms",
        int,
        250,
        "Every failed user login takes at least this long, so its time tells neither which names exist nor which "
        "plugin knows them.",
        minimum=0,
        maximum=5000,
        per_tenant=True,
    ),
    ConfigKey(
        "auth.lockout.account_failures",
        int,
        20,
        "Failed logins to one user account, from any addresses, before the account is locked for "
        "`auth.lockout.account_lock_s`.",
        minimum=1,
        maximum=100_000,
        per_tenant=True,
    ),
    ConfigKey(
        "auth.lockout.account_lock_s",
        int,
        900,
        "How long a user account stays locked after too many failed logins (seconds); an administrator can clear it.",
        minimum=1,
        maximum=30 * 86400,
        per_tenant=True,
    ),
    ConfigKey(
        "auth.lockout.refusal_delay_ms",
        int,
        3000,
        "How long the answer to someone who must wait (`login_locked`, `account_locked`) is held back, so a client "
        "that ignores `Retry-After` cannot make the broker spin.",
        minimum=0,
        maximum=30_000,
    ),
    ConfigKey(
        "auth.rules.networks",
        str,
        "",
        "Networks users may log in from: CIDRs separated by commas (empty: any). A user's own rule replaces it.",
        check=parse_networks,
        per_tenant=True,
    ),
    ConfigKey(
        "auth.rules.hours",
        str,
        "",
        "When users may log in, e.g. `Mon-Fri 07:00-19:00, Sat 09:00-13:00` (empty: always). A user's own rule "
        "replaces it.",
        check=parse_hours,
        per_tenant=True,
    ),
    ConfigKey(
        "auth.rules.timezone",
        str,
        "UTC",
        "Time zone of the hours rules (IANA name).",
        check=parse_timezone,
        per_tenant=True,
    ),
    ConfigKey(
        "auth.totp.required",
        bool,
        False,
        "Users need a second factor (TOTP): those without one enrol in the portal at their next login.",
        per_tenant=True,
    ),
    ConfigKey(
        "auth.totp.issuer", str, "Deckard", "The name authenticator apps show beside the account.", per_tenant=True
    ),
    ConfigKey(
        "auth.tokens.max_days",
        int,
        90,
        "Longest lifetime of a user's personal token (days).",
        minimum=1,
        maximum=3650,
        per_tenant=True,
    ),
    ConfigKey(
        "auth.auto.enabled",
        bool,
        False,
        "Create the user at their first successful directory or single sign-on login (QVD's Auto plugin).",
        per_tenant=True,
    ),
    ConfigKey(
        "auth.auto.osf",
        str,
        "",
        "OSF of the desktop created with an auto-provisioned user (empty: no desktop).",
        per_tenant=True,
    ),
    ConfigKey("auth.auto.tag", str, "default", "Image tag of that desktop.", per_tenant=True),
    ConfigKey(
        "auth.ldap.url",
        str,
        "",
        "Directory URLs, space-separated, tried in order: `ldaps://dc1.example.org ldap://dc2.example.org:389`.",
        pattern=r"(ldaps?://[^\s]+)?(\s+ldaps?://[^\s]+)*",
        per_tenant=True,
    ),
    ConfigKey("auth.ldap.starttls", bool, False, "Use StartTLS on `ldap://` URLs.", per_tenant=True),
    ConfigKey(
        "auth.ldap.ca_file",
        str,
        "",
        "PEM file of the CAs that sign the directory's certificate (empty: the system's).",
        per_tenant=True,
    ),
    ConfigKey(
        "auth.ldap.bind_dn_template",
        str,
        "",
        "Bind as the user directly: `uid={login},ou=people,dc=example,dc=org`, or AD's `{login}@corp.example`. "
        "Empty: search with the service account, then bind.",
        per_tenant=True,
    ),
    ConfigKey("auth.ldap.bind_dn", str, "", "The service account that searches the directory.", per_tenant=True),
    ConfigKey("auth.ldap.bind_password", str, "", "The service account's password.", secret=True, per_tenant=True),
    ConfigKey("auth.ldap.base_dn", str, "", "Where users are searched.", per_tenant=True),
    ConfigKey(
        "auth.ldap.user_filter",
        str,
        "(uid={login})",
        "Finds the user; AD: `(|(sAMAccountName={login})(userPrincipalName={login}))`. The login is escaped.",
        per_tenant=True,
    ),
    ConfigKey("auth.ldap.group_base_dn", str, "", "Where groups are searched (empty: the base DN).", per_tenant=True),
    ConfigKey(
        "auth.ldap.group_filter",
        str,
        "(|(member={dn})(uniqueMember={dn})(memberUid={login}))",
        "Finds the user's groups (AD's `memberOf` is read as well).",
        per_tenant=True,
    ),
    ConfigKey(
        "auth.ldap.required_group",
        str,
        "",
        "Only members of this group DN may log in (empty: anyone).",
        per_tenant=True,
    ),
    ConfigKey(
        "auth.ldap.attr_display_name",
        str,
        "displayName cn",
        "Attributes for the display name, first found.",
        per_tenant=True,
    ),
    ConfigKey("auth.ldap.attr_mail", str, "mail", "Attributes for the mail address, first found.", per_tenant=True),
    ConfigKey(
        "auth.ldap.attr_home", str, "homeDirectory", "Attributes for the home path, first found.", per_tenant=True
    ),
    ConfigKey(
        "auth.ldap.timeout_s",
        float,
        3.0,
        "Seconds the directory has to answer before the login fails with `auth_unavailable`.",
        minimum=0.1,
        maximum=60,
        per_tenant=True,
    ),
    ConfigKey(
        "auth.ldap.admin_groups",
        str,
        "",
        "`<group DN> = <role>; …`: directory groups whose members are administrators, with their role "
        "(`cn=vdi-admins,ou=groups,dc=example,dc=org = Tenant admin`); group DNs are compared case-insensitively.",
        per_tenant=True,
    ),
    ConfigKey(
        "auth.oidc.issuer", str, "", "The OpenID provider's issuer URL (empty: no single sign-on).", per_tenant=True
    ),
    ConfigKey("auth.oidc.client_id", str, "", "Deckard's client id at the provider.", per_tenant=True),
    ConfigKey(
        "auth.oidc.client_secret",
        str,
        "",
        "Its secret (empty: a public client, PKCE only).",
        secret=True,
        per_tenant=True,
    ),
    ConfigKey("auth.oidc.scopes", str, "openid profile email", "Scopes asked for.", per_tenant=True),
    ConfigKey(
        "auth.oidc.login_claim", str, "preferred_username", "The ID-token claim that is the login.", per_tenant=True
    ),
    ConfigKey("auth.oidc.groups_claim", str, "groups", "The ID-token claim that lists groups.", per_tenant=True),
    ConfigKey(
        "auth.oidc.ca_file", str, "", "PEM file of the CAs of the provider's TLS (empty: system's).", per_tenant=True
    ),
    ConfigKey(
        "auth.oidc.timeout_s",
        float,
        5.0,
        "Seconds the provider has to answer.",
        minimum=0.1,
        maximum=60,
        per_tenant=True,
    ),
    ConfigKey(
        "auth.oidc.admin_groups",
        str,
        "",
        "SSO groups whose members are administrators, with their role: `vdi-admins = Tenant admin; <group> = <role>`.",
        per_tenant=True,
    ),
)

# desktops' network (services/network_policy.py, docs/networking.md)
NETWORK_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey(
        "network.egress",
        str,
        "",
        "Where desktops may connect: ordered rules `allow|deny [tcp|udp|icmp] any|ADDRESS[/PREFIX] [port N,N-M]`, "
        "separated by `;` or new lines; the first that matches decides, and what none matches is allowed. The farm "
        "itself (other desktops, nodes, database) is never reachable.",
        per_osf=True,
        check=parse_policy,
    ),
    ConfigKey(
        "network.egress.forbidden",
        str,
        "",
        "Addresses or networks (comma-separated) no desktop of any tenant may reach, whatever its policy says: "
        "management networks, the farm's storage.",
        check=parse_forbidden,
    ),
    ConfigKey(
        "network.dns.search",
        str,
        "",
        "Search domains written into desktops' resolv.conf (space-separated), e.g. `corp.example`.",
        per_osf=True,
        pattern=r"([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*( |$)){0,6}",
    ),
)

# session policies (services/session_policy.py): what happens to idle and disconnected desktops
SESSION_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey(
        "session.stop_after_disconnect_s",
        int,
        0,
        "Seconds after its user disconnected (or since it started, if nobody connected) until a running desktop is "
        "stopped (0: never).",
        per_osf=True,
        minimum=0,
        maximum=30 * 86400,
    ),
    ConfigKey(
        "session.idle_after_s",
        int,
        0,
        "Seconds without keyboard or mouse input from a connected user until `session.idle_action` is taken "
        "(0: never).",
        per_osf=True,
        minimum=0,
        maximum=30 * 86400,
    ),
    ConfigKey(
        "session.idle_warn_s",
        int,
        300,
        "How long before the idle action a notice on the user's display says what will happen and when "
        "(0: no notice). The action never comes sooner than this after the notice.",
        per_osf=True,
        minimum=0,
        maximum=86400,
    ),
    ConfigKey(
        "session.idle_action",
        str,
        "disconnect",
        "What happens to an idle user: `disconnect` (the desktop keeps running) or `stop` (the desktop stops).",
        per_osf=True,
        pattern="disconnect|stop",
    ),
    ConfigKey(
        "session.max_length_s",
        int,
        0,
        "Seconds a desktop may run from its start before it is stopped, connected or not (0: no limit).",
        per_osf=True,
        minimum=0,
        maximum=365 * 86400,
    ),
    ConfigKey(
        "session.max_length_warn_s",
        int,
        300,
        "How long before the maximum session length a notice on the user's display says the desktop will stop "
        "(0: no notice).",
        per_osf=True,
        minimum=0,
        maximum=86400,
    ),
)

# what guests learn at boot (services/guest_metadata.py, docs/networking.md "Guest metadata")
GUEST_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey(
        "guest.user_data",
        str,
        "",
        "User-data handed to desktops that run cloud-init (the metadata service at 169.254.169.254 and the NoCloud "
        "seed): a `#cloud-config` document or a script, at most 64 KiB. Every process in the desktop can read it: "
        "put no secrets in it.",
        per_osf=True,
        check=check_user_data,
    ),
)

# what the desktop may do besides the picture (broker/files.py, docs/portal.md), and its display's OpenGL
PORTAL_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey(
        "portal.files.enabled",
        bool,
        True,
        "Users may upload files into their desktop (`~/Uploads`) and download files from it in the portal.",
        per_osf=True,
    ),
    ConfigKey(
        "portal.files.max_upload_mib",
        int,
        1024,
        "Largest file a user may upload into a desktop from the portal (MiB).",
        per_osf=True,
        minimum=1,
        maximum=1 << 20,
    ),
    ConfigKey(
        "portal.printing.enabled",
        bool,
        True,
        "What users print in their desktop (its PDF printer) reaches their browser as a PDF to open or save.",
        per_osf=True,
    ),
    ConfigKey(
        "nx.shares.enabled",
        bool,
        True,
        "QVD's clients may share their folders into the desktop (`~/Redirected/<name>`) and open its folders, over "
        "the NX slave channel; off, the broker gives them no slave key and the desktop refuses every share.",
        per_osf=True,
    ),
    ConfigKey(
        "nx.shares.in_containers",
        bool,
        False,
        "Container desktops (OSFs that do not keep their overlay) may mount QVD clients' shared folders: their init "
        "gets CAP_SYS_ADMIN in the desktop's own user namespace to fork the mounter and drops it at once. A desktop "
        "whose init is not Deckard's (an uploaded image) would keep it: turn on only if you trust every image "
        "(docs/security.md). Applies at each desktop's next start.",
    ),
    ConfigKey(
        "nx.printing.enabled",
        bool,
        True,
        "QVD's clients that offer their printers (printing flavour `slave4`) get them as the desktop's printers "
        "(`QVD-<id>` queues, in images with CUPS); off, the desktop never asks the client for them.",
        per_osf=True,
    ),
    ConfigKey(
        "portal.sound.enabled",
        bool,
        True,
        "What plays in the desktop (its sound server) is heard in the user's browser; the spy never hears it.",
        per_osf=True,
    ),
    ConfigKey(
        "display.glx",
        bool,
        True,
        "Programs in the desktop get OpenGL (GLX, drawn by Mesa's software renderer). Off, the display starts "
        "without it: about 18 ms sooner and 10 MB less memory per desktop (docs/benchmarks.md), for desktops whose "
        "programs need no OpenGL. Applies at each desktop's next start; a warm pool's guests are replaced.",
        per_osf=True,
    ),
)

KEYS: dict[str, ConfigKey] = {
    k.name: k
    for k in (
        ConfigKey("tenancy.multi", bool, False, "Multi-tenant mode: tenants besides `default` may be created."),
        ConfigKey(
            "auth.lockout.failures",
            int,
            5,
            "Failed administrator logins from one address to one account before each try waits 2, 4, 8 … seconds.",
            minimum=1,
            maximum=1000,
        ),
        ConfigKey(
            "auth.lockout.source_failures",
            int,
            100,
            "Failed administrator logins from one address, to any accounts, before that address is slowed down.",
            minimum=1,
            maximum=1_000_000,
        ),
        ConfigKey(
            "auth.lockout.window_s",
            int,
            600,
            "Seconds after the last wait until failures are forgotten.",
            minimum=1,
            maximum=7 * 86400,
        ),
        ConfigKey(
            "auth.lockout.max_delay_s",
            int,
            900,
            "Longest wait between two login tries (seconds).",
            minimum=1,
            maximum=86400,
        ),
        ConfigKey(
            "image.max_upload_mib",
            int,
            16384,
            "Largest disk image a tenant may upload (MiB); set per tenant by the farm's administrators.",
            per_tenant=True,
            minimum=1,
            maximum=1 << 20,
        ),
        ConfigKey(
            "users.home_on_delete",
            str,
            "archive",
            "What deleting a user does with their home: `archive` (moved to storage/homes-archive) or `delete`.",
            per_tenant=True,
            pattern="archive|delete",
        ),
        ConfigKey(
            "image.expire.soft_s",
            int,
            3600,
            "After publishing a new image on a tag: seconds until desktops on the old one are told to restart.",
            per_tenant=True,
            minimum=0,
            maximum=10 * 365 * 86400,
        ),
        ConfigKey(
            "image.expire.hard_s",
            int,
            7200,
            "After publishing a new image on a tag: seconds until desktops on the old one are stopped.",
            per_tenant=True,
            minimum=0,
            maximum=10 * 365 * 86400,
        ),
        ConfigKey(
            "desktop.start_timeout_s",
            int,
            120,
            "Seconds a desktop may take to start before it fails.",
            per_tenant=True,
            minimum=1,
            maximum=3600,
        ),
        ConfigKey(
            "placement.placer",
            str,
            "qvd",
            "How a node is chosen for a desktop: `qvd` (QVD's weighted score), `fewest` (fewest desktops) or "
            "`binpack` (fill a node before the next).",
            pattern="|".join(PLACERS),
        ),
        ConfigKey(
            "placement.reserve",
            str,
            "largest",
            "Memory kept free for the desktops of a failed node: `largest` (the largest node's share), `none`, or a "
            "fraction of one node's memory such as `0.25`.",
            pattern=r"largest|none|0(\.[0-9]+)?|1(\.0+)?",
        ),
        ConfigKey(
            "pools.tenant_max",
            int,
            10,
            "Warm guests a tenant's administrators may keep in all their warm pools together (the farm's "
            "administrators are not limited); more is refused with `pool_limit`.",
            per_tenant=True,
            minimum=0,
            maximum=10000,
        ),
        ConfigKey(
            "placement.reserve_release_s",
            int,
            1800,
            "Seconds the reserve is released after a node is declared lost (for its desktops to start elsewhere); "
            "then the remaining nodes keep it again, even if that node never comes back.",
            minimum=0,
            maximum=7 * 86400,
        ),
        *IDENTITY_KEYS,
        *NETWORK_KEYS,
        *SESSION_KEYS,
        *GUEST_KEYS,
        *PORTAL_KEYS,
        ConfigKey(
            "volumes.max_gib",
            int,
            100,
            "Total size in GiB of a tenant's volumes (clones count in full); more is refused with "
            "`volume_quota_exceeded`.",
            per_tenant=True,
            minimum=0,
            maximum=1 << 20,
        ),
        ConfigKey(
            "volumes.max_count",
            int,
            20,
            "Number of volumes a tenant may have; more is refused with `volume_quota_exceeded`.",
            per_tenant=True,
            minimum=0,
            maximum=100_000,
        ),
        ConfigKey(
            "ui.page_size", int, 50, "Rows per page in the web admin's lists.", per_tenant=True, minimum=1, maximum=1000
        ),
    )
}


def config_key(name: str) -> ConfigKey:
    return pick(KEYS, name, "config key", "unknown_config_key")


def _number(key: ConfigKey, raw: Any) -> int | float:
    """``raw`` (a JSON number or ASCII text) as the key's number type; ``ValueError`` if it is not one."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValueError(raw)
    if isinstance(raw, str):
        text = raw.strip()
        if key.type is int:
            return parse_int(text, key.name)  # ASCII digits only: no full-width digits, no "1_000"
        if not _DECIMAL.fullmatch(text):
            raise ValueError(raw)
        raw = float(text)
    if isinstance(raw, float) and (not math.isfinite(raw) or (key.type is int and not raw.is_integer())):
        raise ValueError(raw)
    return int(raw) if key.type is int else float(raw)


def parse_value(key: ConfigKey, raw: Any) -> Any:
    """A value given as JSON or as CLI text, checked against the key's type and bounds (422
    ``bad_config_value``, naming the key and the allowed range)."""
    value: Any = raw
    try:
        if key.type is bool:
            if isinstance(raw, str):
                low = raw.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                value = low in ("1", "true", "yes", "on")
            elif not isinstance(raw, bool):
                raise ValueError(raw)
        elif key.type in (int, float):
            value = _number(key, raw)
        elif not isinstance(raw, str) or (key.pattern and not re.fullmatch(key.pattern, raw)):
            raise ValueError(raw)
        elif key.check is not None:
            key.check(raw)
    except BadInput:
        if key.check is not None:  # the check's own message says what is wrong and how to write it
            raise
        raise BadInput(
            f"{str(raw)[:40]!r} is not a valid {key.type.__name__} for {key.name}{_range_text(key)}",
            code="bad_config_value",
            details=_range_details(key),
        ) from None
    except (TypeError, ValueError):
        raise BadInput(
            f"{str(raw)[:40]!r} is not a valid {key.type.__name__} for {key.name}{_range_text(key)}",
            code="bad_config_value",
            details=_range_details(key),
        ) from None
    lo = -math.inf if key.minimum is None else key.minimum
    hi = math.inf if key.maximum is None else key.maximum
    if key.type in (int, float) and not lo <= value <= hi:
        raise BadInput(
            f"{key.name} must be{_range_text(key)}, not {value}", code="bad_config_value", details=_range_details(key)
        )
    return value


def _range_text(key: ConfigKey) -> str:
    if key.pattern is not None:
        return f" ({key.description})"
    if key.minimum is not None and key.maximum is not None:
        return f" between {key.minimum:g} and {key.maximum:g}"
    if key.minimum is not None:
        return f" at least {key.minimum:g}"
    if key.maximum is not None:
        return f" at most {key.maximum:g}"
    return ""


def _range_details(key: ConfigKey) -> dict[str, Any]:
    bounds = {"minimum": key.minimum, "maximum": key.maximum, "pattern": key.pattern}
    return {"key": key.name, **{k: v for k, v in bounds.items() if v is not None}}
