"""The objects the admin API answers with, as pydantic models shared by the API and its client.

Why one module for both sides: the routes declare these as response models (so the OpenAPI document and the
JSON on the wire come from them) and ``client/api.py`` validates answers into the same classes, so the CLI,
the tests and the benchmarks read ``desk.state`` instead of ``row["state"]`` and a renamed field breaks at
type-check time on both sides at once.  Requests stay in the routes: they need the API's strict input types
(``api/strict.py``).  pydantic does no I/O, so this sits in ``model`` with the other pure definitions.

Fields an administrator may not see (``<object>.see.<field>`` ACLs) or did not ask for (``fields=``) are
absent from an answer, so most fields are optional; a model validated from an answer remembers which fields
came (``model_fields_set``) and ``dump`` gives back exactly those.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

T = TypeVar("T")


class Schema(BaseModel):
    """The base of every answer."""

    def dump(self) -> dict[str, Any]:
        """The fields the answer carried, as JSON values (what ``--json`` prints)."""
        return self.model_dump(mode="json", exclude_unset=True)


class Page(Schema, Generic[T]):
    """A list answer: one page of ``items`` and the number matching the request."""

    items: list[T]
    total: int = Field(description="Number of items matching the request (all of them until paging arrives).")


class Health(Schema):
    status: Literal["ok", "degraded"]
    version: str
    database: Literal["ok", "unreachable"]


class LoginResult(Schema):
    token: str = Field(description="Send as 'Authorization: Bearer <token>'.")
    expires_at: dt.datetime


class WhoAmI(Schema):
    kind: str
    id: int | None
    name: str
    tenant_id: int | None
    acls: list[str]


class Tenant(Schema):
    id: int
    name: str
    blocked: bool
    description: str
    created_at: dt.datetime


class Admin(Schema):
    id: int
    tenant_id: int
    name: str
    blocked: bool
    created_at: dt.datetime
    roles: list[str] | None = Field(default=None, description="Role names (needs `admin.see.roles`).")


class Grant(Schema):
    model_config = ConfigDict(extra="forbid")  # also a request field: a typo must not pass

    acl: str = Field(min_length=1, max_length=128, description="An ACL name or a pattern (`desktop.*`, `*.see`).")
    positive: bool = Field(default=True, description="False: a negative grant, which always wins.")


class Role(Schema):
    id: int
    tenant_id: int
    name: str
    description: str
    fixed: bool
    created_at: dt.datetime
    grants: list[Grant] = Field(default_factory=list)
    inherits: list[int] = Field(default_factory=list)
    acls: list[str] = Field(default_factory=list, description="The effective ACLs of the role.")


class Acl(Schema):
    name: str
    object: str
    gated_field: bool = Field(description="Whether it lets an administrator see a hidden field.")


class User(Schema):
    id: int
    tenant_id: int | None = None
    login: str | None = None
    blocked: bool | None = None
    description: str | None = None
    created_at: dt.datetime | None = None
    origin: str | None = None  # local | ldap | oidc
    display_name: str | None = None
    mail: str | None = None
    allowed_networks: str | None = None
    allowed_hours: str | None = None
    ssh_keys: list[str] | None = Field(
        default=None, description="Public SSH keys handed to the user's desktops at boot (one user's answer only)."
    )


class Osf(Schema):
    id: int | None = None
    tenant_id: int | None = None
    name: str | None = None
    memory_mib: int | None = None
    cpus: float | None = None
    keep_overlay: bool | None = Field(default=None, description="Keep the desktop's writable layer across starts.")
    driver: str | None = Field(default=None, description="container, vm or fake.")
    description: str | None = None
    created_at: dt.datetime | None = None
    network_id: int | None = None
    network: str | None = Field(default=None, description="The network its new desktops are on; null: the default.")


class Network(Schema):
    """A tenant network (``docs/networking.md``): ``private`` to a tenant, or ``shared`` (no tenant) and usable by
    the ``tenants`` it is granted to (a tenant administrator sees only its own tenant there)."""

    id: int
    tenant_id: int | None = None
    tenant: str | None = None
    name: str | None = None
    kind: str | None = Field(default=None, description="private, shared or flat.")
    range: str | None = Field(default=None, description="IPv4 CIDR; its first 10 hosts are kept for nodes.")
    gateway: str | None = Field(default=None, description="Flat networks: the router desktops use.")
    interface: str | None = Field(default=None, description="Flat networks: the node interface it is on.")
    vlan: int | None = Field(default=None, description="Flat networks: the VLAN tag (none: untagged).")
    description: str | None = None
    created_at: dt.datetime | None = None
    tenants: list[str] | None = Field(default=None, description="Shared networks: the tenants granted.")


class Pool(Schema):
    """A warm pool (``docs/pools.md``): how many started desktops of an OSF and tag the farm keeps for users."""

    id: int
    osf_id: int | None = None
    osf: str | None = None
    tenant_id: int | None = None
    tag: str | None = None
    size: int | None = Field(default=None, description="Warm guests kept ready (within its hours, if any).")
    hours: str | None = Field(default=None, description="When the pool is kept (login rules' windows); '': always.")
    timezone: str | None = None
    wanted: int | None = Field(default=None, description="How many it keeps right now (0 outside its hours).")
    ready: int | None = Field(default=None, description="Warm guests ready to be taken over now.")
    starting: int | None = Field(default=None, description="Warm guests booting now.")
    last_error: str | None = Field(default=None, description="Why its last warm guest failed to start, if it did.")
    last_error_at: dt.datetime | None = None
    created_at: dt.datetime | None = None


class Image(Schema):
    """A disk image; ``path`` and ``digest`` need ``image.see.path`` / ``image.see.digest``."""

    id: int | None = None
    osf_id: int | None = None
    osf: str | None = None
    tenant_id: int | None = None
    version: str | None = None
    path: str | None = None
    digest: str | None = None
    size: int | None = None
    state: str | None = Field(default=None, description="new, building, uploading, ready, published, retired, failed")
    status_message: str | None = Field(default=None, description="Progress (`42% uploading`) or why it failed.")
    blocked: bool | None = None
    tags: list[str] | None = None
    uploaded_bytes: int | None = Field(default=None, description="Bytes received so far: resume an upload here.")
    expire_soft_s: int | None = None
    expire_hard_s: int | None = None
    published_at: dt.datetime | None = None
    created_at: dt.datetime | None = None
    expiring_desktops: list[int] | None = Field(
        default=None, description="After publish: the running desktops given expiry deadlines."
    )
    profile: str | None = Field(
        default=None, description="Build profile it was made from (minimal, standard, ...); empty when unknown."
    )


class Desktop(Schema):
    id: int | None = None  # absent only when `fields=` leaves it out
    tenant_id: int | None = None
    name: str | None = None
    user_id: int | None = None
    user: str | None = None
    osf_id: int | None = None
    osf: str | None = None
    tag: str | None = None
    network_id: int | None = None
    network: str | None = Field(default=None, description="The tenant network it is on; null: the default network.")
    network_ip: str | None = Field(default=None, description="Its address in that network (what the guest sees).")
    ip: str | None = Field(default=None, description="Its farm address: how nodes and brokers reach it.")
    mac: str | None = None
    blocked: bool | None = None
    description: str | None = None
    state: str | None = Field(
        default=None, description="Observed state: stopped, starting, running, stopping, zombie, failed."
    )
    state_at: dt.datetime | None = None
    cmd: str | None = Field(default=None, description="Pending command (start/stop) not yet carried out by a node.")
    node_id: int | None = None
    node: str | None = None
    user_state: str | None = None
    image_id: int | None = None
    failure_reason: str | None = None
    started_at: dt.datetime | None = None
    expire_soft_at: dt.datetime | None = Field(default=None, description="The user is told to save their work.")
    expire_hard_at: dt.datetime | None = Field(default=None, description="The desktop is stopped.")
    created_at: dt.datetime | None = None
    disconnected_since: dt.datetime | None = Field(
        default=None, description="Running, and nobody connected since then (from its start if nobody connected)."
    )
    idle_since: dt.datetime | None = Field(
        default=None,
        description="Its connected user's last keyboard or mouse input (or the connection, if later); null when "
        "nobody is connected or the agent cannot tell.",
    )


class Node(Schema):
    id: int
    name: str | None = None
    address: str | None = None
    broker_url: str | None = None
    state: str | None = None
    blocked: bool | None = None
    cmd: str | None = None
    pid: int | None = None
    started_at: dt.datetime | None = None
    heartbeat_at: dt.datetime | None = None
    mem_total_mib: int | None = None
    mem_free_mib: int | None = None
    cpus: float | None = None
    load: float | None = None
    desktops_running: int | None = None
    created_at: dt.datetime | None = None
    lost_at: dt.datetime | None = None
    lost_reason: str | None = Field(
        default=None,
        description="Why the node was declared lost and what fencing it did: `fencing failed (…)` means its "
        "desktops stay assigned (unavailable) until it is fenced.",
    )
    fence_agent: str | None = Field(
        default=None, description="Its own fence agent (e.g. fence_ipmilan); empty: the farm's default fencing."
    )
    fence_options: dict[str, str] | None = Field(
        default=None, description="The fence agent's options, passwords masked."
    )


class Connection(Schema):
    id: int
    tenant_id: int | None = None
    desktop_id: int | None = None
    desktop: str | None = None
    user_id: int | None = None
    login: str | None = None
    broker_node_id: int | None = None
    node_id: int | None = Field(default=None, description="The node the desktop ran on (once connected).")
    image_id: int | None = Field(default=None, description="The disk image it ran (once connected).")
    source: str | None = None
    protocol: str | None = None
    started_at: dt.datetime | None = None
    connected_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    result: str | None = None
    reason: str | None = None
    t_auth_ms: float | None = None
    t_claim_ms: float | None = None
    t_start_ms: float | None = None
    t_agent_ms: float | None = None
    t_display_ms: float | None = None
    t_total_ms: float | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None


class BulkResult(Schema):
    ok: list[int]
    failed: dict[str, dict[str, str]] = Field(description='Per failed id: `{"code", "message"}`.')


class AuditRecord(Schema):
    id: int | None = None
    at: dt.datetime | None = None
    admin_id: int | None = None
    admin_name: str | None = None
    tenant_id: int | None = None
    action: str | None = Field(default=None, description="`<object>.<action>`, e.g. `desktop.start`.")
    object_type: str | None = None
    object_id: str | None = None
    arguments: Any = Field(default=None, description="The request's JSON body, secrets masked as `***`.")
    result: str | None = Field(default=None, description="`ok` or `failed`.")
    status: int | None = None
    error_code: str | None = None
    source: str | None = None
    hash: str | None = None


class AuditVerification(Schema):
    ok: bool
    checked: int = Field(description="Records found intact before the first broken one (all of them when ok).")
    first_broken_id: int | None
    reason: str


ConfigValue = bool | int | float | str


class ConfigEntry(Schema):
    key: str
    value: ConfigValue
    default: ConfigValue
    source: str = Field(description="Where the value comes from: `default`, `global`, `tenant` or `osf`.")
    type: str
    per_tenant: bool
    per_osf: bool = Field(default=False, description="May also differ per OSF (egress and session policies).")
    description: str
    secret: bool = Field(default=False, description="A password: its value is shown as `***` when set.")


class ConsoleLog(Schema):
    """``deckard desktop console-log``: the last bytes of what the desktop's guest wrote on its console."""

    desktop: str
    text: str
    size: int = Field(description="Bytes in the whole log; `text` is its end.")
    truncated: bool
    found: bool = Field(description="False: no console log is kept for this desktop (never started here).")


class NetworkDecision(Schema):
    """``deckard desktop explain-network``: what the node's filter does with a connection and why."""

    desktop: str
    destination: str
    proto: str
    port: int | None
    allowed: bool
    decided_by: str = Field(
        description="`farm` (never reachable), `resolver` (the node's DNS), `rule` (a rule of the policy) or "
        "`default` (no rule matched: allowed)."
    )
    reason: str
    rule: str | None = Field(description="The deciding rule's text.")
    rule_index: int | None = Field(description="Its position in the policy, from 1.")
    policy_source: str = Field(description="The layer the policy comes from: `default`, `global`, `tenant`, `osf`.")
    policy: list[str] = Field(description="The desktop's rules, in order.")


class ActivityPoint(Schema):
    at: dt.datetime = Field(description="The start of the step.")
    running: int | None = Field(description="Desktops running: the step's highest; null when nothing was sampled.")
    connected: int | None = Field(description="Users connected: the step's highest; null when nothing was sampled.")
    nodes: int | None = Field(description="Nodes running in the farm: the step's highest; null when not sampled.")


class Activity(Schema):
    step_s: int = Field(description="Seconds each point covers: whole minutes, at most 288 points.")
    points: list[ActivityPoint] = Field(description="From the first sample of the last 24 h, in time order.")


class Stats(Schema):
    at: dt.datetime
    desktops: dict[str, Any] = Field(description="`total`, `by_state` {state: n}, `blocked`.")
    users: dict[str, int] = Field(description="`total`, `blocked`, `connected` (desktops with a user connected).")
    nodes: dict[str, Any] = Field(description="`total`, `by_state`, `blocked`.")
    time_to_desktop_ms: dict[str, Any] = Field(
        description="`last_24h` {count, p50, p90, p99} and `hourly` [{hour, count, p50, p90, p99}]."
    )
    busiest_nodes: list[dict[str, Any]]
    near_expiry: list[dict[str, Any]] = Field(description="Desktops whose soft or hard expiry is within 24 h.")
    activity: Activity = Field(description="Desktops running, users connected and nodes running over the last 24 h.")


class PhaseFigures(Schema):
    count: int = Field(description="Connections in which this phase was timed (`agent`: cold starts only).")
    p50: float | None = Field(default=None, description="Milliseconds, nearest rank; null without connections.")
    p95: float | None = None


class ImageTimeToDesktop(Schema):
    image_id: int | None = Field(description="Null: connections recorded before images were, or a deleted image.")
    osf: str | None = None
    version: str | None = None
    count: int
    phases: dict[str, PhaseFigures]


class NodeTimeToDesktop(Schema):
    node_id: int | None = Field(description="Null: connections recorded before nodes were, or a deleted node.")
    node: str | None = None
    count: int
    phases: dict[str, PhaseFigures]


class TimeToDesktop(Schema):
    """Time to desktop per phase, per image and per node (`GET /stats/time-to-desktop`)."""

    at: dt.datetime
    window: str = Field(description="As asked (`24h` by default; from `1m` to `7d`).")
    since: dt.datetime
    phases: list[str] = Field(description="`auth`, `claim`, `start`, `agent`, `display`, `total`, in that order.")
    count: int = Field(description="Connections that reached their desktop within the window.")
    by_image: list[ImageTimeToDesktop] = Field(description="Most connections first.")
    by_node: list[NodeTimeToDesktop] = Field(description="Most connections first.")


class NodeCandidate(Schema):
    node_id: int
    node: str
    eligible: bool
    score: float | None = Field(description="Placer score (highest wins); null when a filter excluded the node.")
    excluded_by: str | None = Field(description="The filter that excluded the node, in words.")
    state: str
    blocked: bool
    mem_free_mib: int | None = Field(description="Host figures: null for a tenant's administrator.")
    committed_mib: int | None
    desktops: int | None
    load: float | None
    cpus: float | None


class Explanation(Schema):
    desktop_id: int
    desktop: str
    state: str
    node_id: int | None
    memory_mib: int
    placement_group: str | None
    placement_policy: str | None
    would_choose: str | None = Field(description="The node a start would pick now (null: none can take it).")
    nodes: list[NodeCandidate]


class Placement(Schema):
    desktop_id: int
    placement_group: str | None
    placement_policy: str | None = Field(description="spread or pack; null outside a group.")


class NodeMaintenance(Schema):
    """What a maintenance action on a node did; the fields depend on the action."""

    node_id: int
    node: str
    blocked: bool | None = None
    cmd: str | None = Field(default=None, description="stop or restart: the command the node daemon carries out.")
    notified_desktops: int | None = Field(default=None, description="drain: desktops whose users were told.")
    stopping_desktops: list[int] | None = Field(default=None, description="evacuate: desktops being stopped.")


# ---- identity, as administrators see it (api/routes/identity.py) --------------------------------------------


class LoginBan(Schema):
    """A login counter that makes someone wait now (``services/lockout.py``)."""

    key: str = Field(description="What is counted: `account:<tenant>/<login>`, `user:…@<address>`, `source:<address>`.")
    kind: Literal["user", "account", "pair", "source"]
    failures: int
    locked_until: dt.datetime


def _utc(at: dt.datetime) -> dt.datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)


Utc = Annotated[dt.datetime, AfterValidator(_utc)]  # SQLite hands back naive times; every stored time is UTC


class SecondFactorStatus(Schema):
    """A second factor (TOTP) of one account: the portal user's, the acting administrator's own."""

    enrolled: bool = Field(description="A confirmed second factor: logins ask for its code.")
    pending: bool = Field(description="An enrolment was started but not confirmed.")
    recovery_codes_left: int


class UserSecondFactor(SecondFactorStatus):
    user_id: int


class UserToken(Schema):
    """A user's personal token (the secret is never shown again after it was made)."""

    id: int
    name: str
    created_at: Utc
    expires_at: Utc
    last_used_at: Utc | None = None
    revoked: bool


class AdminToken(Schema):
    """One of the acting administrator's API tokens; ``expires_at`` null: made by `deckard up`, never expires."""

    id: int
    name: str
    created_at: Utc
    expires_at: Utc | None
    revoked: bool


class TokenCreated(Schema):
    """A new personal or API token."""

    token: str = Field(
        description="The secret, shown this once: send as 'Authorization: Bearer <token>' (QVD client: --token)."
    )
    id: int
    name: str
    created_at: Utc
    expires_at: Utc


class SecondFactorEnrolment(Schema):
    secret: str = Field(description="The TOTP secret (base32), for typing into an app by hand.")
    uri: str = Field(description="The `otpauth://` URI an authenticator app reads from a QR code.")


class RecoveryCodes(Schema):
    recovery_codes: list[str] = Field(description="Single-use codes for when the app is lost: shown only now.")


class VolumeAttachment(Schema):
    """A desktop a volume is attached to.  ``pending``: what the desktop's node has still to do (``attach``,
    ``detach``; ``failed`` with ``error_code`` when it could not); ``in_guest``: the running guest has it now."""

    desktop_id: int
    desktop: str
    read_only: bool
    attached_at: dt.datetime
    pending: str | None = None
    in_guest: bool = False
    error_code: str | None = None
    error: str | None = None


class Volume(Schema):
    """A block volume of a tenant (``docs/volumes.md``); ``state`` is ``creating``, ``ready`` or ``deleting``.
    A list asked for some ``fields=`` carries only those (and the id)."""

    id: int
    tenant_id: int | None = None
    name: str | None = None
    size_gib: int | None = None
    state: str | None = None
    status_message: str | None = None
    description: str | None = None
    created_at: dt.datetime | None = None
    attachments: list[VolumeAttachment] = Field(default_factory=list)


class VolumeSnapshot(Schema):
    id: int
    volume_id: int
    name: str
    size_gib: int = Field(description="The volume's size when the snapshot was taken.")
    created_at: dt.datetime
