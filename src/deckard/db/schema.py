"""Tables of the farm database (SQLAlchemy Core), named after QVD's where users of the field know them.

QVD keeps a desktop in two tables (``vms`` for what the admin asked for, ``vm_runtimes`` for what nodes
report); Deckard keeps both halves in ``desktops`` and documents which columns are desired state (written by
API/broker) and which are observed state (written only by the owning node).  Migrations live in
``db/migrations`` and are applied at start.
"""

from __future__ import annotations

import secrets
from typing import Any

import sqlalchemy as sa

from deckard.model.states import DesktopState, ImageState, NodeState, UserState

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

TS = sa.DateTime(timezone=True)


def _new_home_key(context: Any) -> str:
    """``<login>+<random>``: readable by an operator, unique to the account ('+' is never in a login)."""
    login = str(context.get_current_parameters().get("login") or "user")
    return f"{login}+{secrets.token_hex(6)}"


tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("blocked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", TS, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.ForeignKey("tenants.id", ondelete="RESTRICT"), nullable=False, index=True),
    sa.Column("login", sa.String(64), nullable=False),
    sa.Column("password_hash", sa.Text, nullable=True),  # NULL: only external auth plugins can log in
    sa.Column("blocked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", TS, nullable=False),
    # names the home directory (storage/homes/<tenant>/<home_key>): random per account, so a user created later
    # with the same login (or, on SQLite, the same recycled id) never gets an older user's home
    sa.Column("home_key", sa.String(80), nullable=False, default=_new_home_key, server_default=""),
    # identity (0009): who made the account (local | ldap | oidc), what the directory or SSO said of the person,
    # and the user's own login rules ("" = the tenant's)
    sa.Column("origin", sa.String(16), nullable=False, server_default="local"),
    sa.Column("external_id", sa.String(255), nullable=False, server_default=""),
    sa.Column("display_name", sa.String(128), nullable=False, server_default=""),
    sa.Column("mail", sa.String(254), nullable=False, server_default=""),
    sa.Column("allowed_networks", sa.Text, nullable=False, server_default=""),
    sa.Column("allowed_hours", sa.Text, nullable=False, server_default=""),
    # public SSH keys (0011): a JSON list of authorized_keys lines, handed to the user's desktops at boot
    sa.Column("ssh_keys", sa.Text, nullable=False, server_default="[]"),
    sa.UniqueConstraint("tenant_id", "login", name="uq_users_tenant_login"),
    sqlite_autoincrement=True,  # ids never reused (0018): a uid, a layer's name
)

administrators = sa.Table(
    "administrators",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.ForeignKey("tenants.id", ondelete="RESTRICT"), nullable=False, index=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("password_hash", sa.Text, nullable=True),  # NULL: a directory or SSO administrator (0009)
    sa.Column("blocked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("origin", sa.String(16), nullable=False, server_default="local"),
    sa.UniqueConstraint("tenant_id", "name", name="uq_administrators_tenant_name"),
)

admin_tokens = sa.Table(
    "admin_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("admin_id", sa.ForeignKey("administrators.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # sha256 hex of the secret
    sa.Column("kind", sa.String(16), nullable=False),  # session | api
    sa.Column("name", sa.String(64), nullable=False, server_default=""),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("expires_at", TS, nullable=True),
    sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
)

# ---- tenant networks (0015): the segments desktops live on, beside the farm's default network -----------------
# ``tenant_id`` NULL: a shared network, the farm's own (made by an all-tenants administrator) and usable by the
# tenants in ``network_grants``; a private network belongs to one tenant.  Desktops and OSFs with ``network_id``
# NULL are on the farm's default network (``network.range``, a setting, not a row).  A desktop on a network has an
# address there (``desktops.network_ip``) besides its farm address (``desktops.ip``); nodes realise each network
# as a segment of its own (``drivers/tenant_net.py``).

networks = sa.Table(
    "networks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.ForeignKey("tenants.id", ondelete="RESTRICT"), nullable=True, index=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # private | shared | flat
    sa.Column("range", sa.String(18), nullable=False),  # IPv4 CIDR, normalised (10.1.0.0/24)
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("tenant_id", "name", name="uq_networks_tenant_name"),  # NULL tenants: the service checks
    # flat: a network of the machines' own that desktops join directly (``drivers/tenant_net.py``): the node
    # interface it is on, its VLAN tag (NULL: untagged), the router its desktops use (NULL: the first address)
    sa.Column("interface", sa.String(15), nullable=True),
    sa.Column("vlan", sa.Integer, nullable=True),
    sa.Column("gateway", sa.String(15), nullable=True),
    sa.CheckConstraint(
        "(kind = 'private' AND tenant_id IS NOT NULL) OR (kind IN ('shared', 'flat') AND tenant_id IS NULL)",
        name="kind",
    ),
    sa.CheckConstraint("(kind = 'flat') = (interface IS NOT NULL)", name="flat"),
)

network_grants = sa.Table(
    "network_grants",
    metadata,
    sa.Column("network_id", sa.ForeignKey("networks.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tenant_id", sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True, index=True),
)

osfs = sa.Table(
    "osfs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.ForeignKey("tenants.id", ondelete="RESTRICT"), nullable=False, index=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("memory_mib", sa.Integer, nullable=False, server_default="512"),
    sa.Column("cpus", sa.Float, nullable=False, server_default="1"),
    sa.Column("keep_overlay", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("driver", sa.String(16), nullable=False, server_default="container"),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", TS, nullable=False),
    # the network its desktops are made on (0015); NULL: the farm's default network
    sa.Column("network_id", sa.ForeignKey("networks.id", ondelete="RESTRICT"), nullable=True, index=True),
    sa.UniqueConstraint("tenant_id", "name", name="uq_osfs_tenant_name"),
)

disk_images = sa.Table(
    "disk_images",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("osf_id", sa.ForeignKey("osfs.id", ondelete="RESTRICT"), nullable=False, index=True),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),  # relative to the storage root's images/ (or absolute)
    sa.Column("digest", sa.String(64), nullable=False, server_default=""),
    sa.Column("size", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("state", sa.String(16), nullable=False, server_default=ImageState.NEW.value),
    sa.Column("status_message", sa.Text, nullable=False, server_default=""),
    sa.Column("blocked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("expire_soft_s", sa.Integer, nullable=True),  # at publish: soft expiry of desktops on the old image
    sa.Column("expire_hard_s", sa.Integer, nullable=True),
    sa.Column("uploaded_bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("published_at", TS, nullable=True),
    sa.Column("profile", sa.String(32), nullable=False, server_default=""),  # build profile (0010); "" = unknown
    sa.UniqueConstraint("osf_id", "version", name="uq_disk_images_osf_version"),
)

image_tags = sa.Table(
    "image_tags",
    metadata,
    sa.Column("osf_id", sa.ForeignKey("osfs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag", sa.String(64), primary_key=True),
    sa.Column("image_id", sa.ForeignKey("disk_images.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("updated_at", TS, nullable=False),
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("address", sa.String(64), nullable=False, server_default=""),
    sa.Column("broker_url", sa.String(128), nullable=False, server_default=""),
    sa.Column("state", sa.String(16), nullable=False, server_default=NodeState.STOPPED.value),
    sa.Column("blocked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("cmd", sa.String(16), nullable=True),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("started_at", TS, nullable=True),
    sa.Column("heartbeat_at", TS, nullable=True),
    sa.Column("mem_total_mib", sa.Integer, nullable=False, server_default="0"),
    sa.Column("mem_free_mib", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cpus", sa.Float, nullable=False, server_default="0"),
    sa.Column("load", sa.Float, nullable=False, server_default="0"),
    sa.Column("desktops_running", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", TS, nullable=False),
    # farm (0006): what the node can run, where its guests live on its machine, and why it was declared lost
    sa.Column("driver", sa.String(16), nullable=False, server_default="container"),
    sa.Column("run_dir", sa.Text, nullable=False, server_default=""),
    sa.Column("boot_id", sa.String(64), nullable=False, server_default=""),  # which machine boot ``pid`` is on
    sa.Column("lost_at", TS, nullable=True),
    sa.Column("lost_reason", sa.Text, nullable=True),
    # fencing (0014): the fence agent another node runs to power this one off when it is lost (model/fence.py);
    # "" = the farm's default fencing.  fence_options is JSON (key → value, secrets included: never sent out)
    sa.Column("fence_agent", sa.String(64), nullable=False, server_default=""),
    sa.Column("fence_options", sa.Text, nullable=False, server_default="{}"),
    sa.Column("fence_tried_at", TS, nullable=True),  # the last fence attempt: one monitor retries per interval
)

desktops = sa.Table(
    "desktops",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # desired state (admin): what the desktop is
    sa.Column("tenant_id", sa.ForeignKey("tenants.id", ondelete="RESTRICT"), nullable=False, index=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("user_id", sa.ForeignKey("users.id", ondelete="RESTRICT"), nullable=False, index=True),
    sa.Column("osf_id", sa.ForeignKey("osfs.id", ondelete="RESTRICT"), nullable=False, index=True),
    sa.Column("tag", sa.String(64), nullable=False, server_default="default"),
    sa.Column("ip", sa.String(45), nullable=False, unique=True),  # the farm address: how nodes and brokers reach it
    sa.Column("mac", sa.String(17), nullable=False),
    sa.Column("blocked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", TS, nullable=False),
    # desired state (API/broker): the command and where it runs
    sa.Column("cmd", sa.String(16), nullable=True),
    sa.Column("cmd_at", TS, nullable=True),
    sa.Column("node_id", sa.ForeignKey("nodes.id", ondelete="SET NULL"), nullable=True, index=True),
    # observed state (owning node)
    sa.Column("state", sa.String(16), nullable=False, server_default=DesktopState.STOPPED.value, index=True),
    sa.Column("state_at", TS, nullable=True, index=True),  # indexed (0015): nodes read what changed since
    sa.Column("image_id", sa.ForeignKey("disk_images.id", ondelete="SET NULL"), nullable=True),
    sa.Column("agent_token", sa.String(64), nullable=True),
    sa.Column("agent_ok_at", TS, nullable=True),
    sa.Column("failure_reason", sa.Text, nullable=True),
    sa.Column("started_at", TS, nullable=True),
    sa.Column("start_guest_ms", sa.Float, nullable=True),  # last start: claim → guest launched
    sa.Column("start_agent_ms", sa.Float, nullable=True),  # last start: guest launched → agent answering
    sa.Column("expire_soft_at", TS, nullable=True),
    sa.Column("expire_hard_at", TS, nullable=True),
    sa.Column("expire_notified_at", TS, nullable=True),  # the agent ran the soft-expiry notice
    # user connection (broker)
    sa.Column("user_state", sa.String(16), nullable=False, server_default=UserState.DISCONNECTED.value),
    sa.Column("user_state_at", TS, nullable=True),
    sa.Column("session_id", sa.String(32), nullable=True),  # the tunnel that owns the display; takeover replaces it
    sa.Column("session_node_id", sa.ForeignKey("nodes.id", ondelete="SET NULL"), nullable=True),
    # placement (0006): desktops of one group are spread over nodes (anti-affinity) or packed (affinity)
    sa.Column("placement_group", sa.String(64), nullable=True),
    sa.Column("placement_policy", sa.String(16), nullable=True),  # spread | pack
    # session policies (0010): the user's last keyboard or mouse input (the agent reports it) and the idle warning
    sa.Column("input_at", TS, nullable=True),
    sa.Column("idle_warned_at", TS, nullable=True),
    # tenant networks (0015): the network the desktop is on and its address there (what the guest sees; the node
    # maps it 1:1 to ``ip``); both NULL: the farm's default network, where ``ip`` is the guest's own address
    sa.Column("network_id", sa.ForeignKey("networks.id", ondelete="RESTRICT"), nullable=True, index=True),
    sa.Column("network_ip", sa.String(45), nullable=True),
    # warm pools (0016): the warm guest it took over at its start (``model/warm_pool.py``); NULL: its own guest
    sa.Column("guest", sa.String(64), nullable=True),
    # the display before the agent (0017): when the node launched a guest whose init starts the user's display
    # (the broker may dial it while the agent starts); a start's claim clears it
    sa.Column("display_at", TS, nullable=True),
    sa.UniqueConstraint("tenant_id", "name", name="uq_desktops_tenant_name"),
    sa.CheckConstraint("(network_id IS NULL) = (network_ip IS NULL)", name="network_ip"),
    sqlite_autoincrement=True,  # ids never reused (0018): a uid, a layer's name
)

# an address in a tenant network is unique in that network: two tenants' networks may use the same range
sa.Index("ux_desktops_network_ip", desktops.c.network_id, desktops.c.network_ip, unique=True)

connections = sa.Table(
    "connections",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("desktop_id", sa.ForeignKey("desktops.id", ondelete="CASCADE"), nullable=True, index=True),
    sa.Column("user_id", sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True),
    sa.Column("login", sa.String(130), nullable=False, server_default=""),
    sa.Column("broker_node_id", sa.ForeignKey("nodes.id", ondelete="SET NULL"), nullable=True),
    # where the desktop ran (0013): written by the broker when the display answers, for per-image/node figures
    sa.Column("image_id", sa.ForeignKey("disk_images.id", ondelete="SET NULL"), nullable=True, index=True),
    sa.Column("node_id", sa.ForeignKey("nodes.id", ondelete="SET NULL"), nullable=True, index=True),
    sa.Column("source", sa.String(64), nullable=False, server_default=""),
    sa.Column("protocol", sa.String(16), nullable=False, server_default="qvd"),
    sa.Column("started_at", TS, nullable=False, index=True),
    sa.Column("connected_at", TS, nullable=True),
    sa.Column("ended_at", TS, nullable=True),
    sa.Column("result", sa.String(32), nullable=False, server_default="open"),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    # per-phase timings in milliseconds (time-to-desktop is a first-class metric)
    sa.Column("t_auth_ms", sa.Float, nullable=True),
    sa.Column("t_claim_ms", sa.Float, nullable=True),
    sa.Column("t_start_ms", sa.Float, nullable=True),
    sa.Column("t_agent_ms", sa.Float, nullable=True),
    sa.Column("t_display_ms", sa.Float, nullable=True),
    sa.Column("t_total_ms", sa.Float, nullable=True),
    sa.Column("bytes_in", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("bytes_out", sa.BigInteger, nullable=False, server_default="0"),
)

config = sa.Table(
    "config",
    metadata,
    sa.Column("tenant_id", sa.Integer, primary_key=True),  # 0 = global row
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

# the OSF layer (0010): keys marked ``per_osf`` in the catalogue may differ per OSF, over the tenant's value
osf_config = sa.Table(
    "osf_config",
    metadata,
    sa.Column("osf_id", sa.ForeignKey("osfs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)


# ---- admin plane: roles and ACLs (QVD: roles, acl_role_relations, role_role_relations) ----------------------

roles = sa.Table(
    "roles",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("fixed", sa.Boolean, nullable=False, server_default=sa.false()),  # predefined: not editable
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("tenant_id", "name", name="uq_roles_tenant_name"),
)

role_acls = sa.Table(
    "role_acls",
    metadata,
    sa.Column("role_id", sa.ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("acl", sa.String(128), primary_key=True),  # an ACL name or a pattern (desktop.*, *.see)
    sa.Column("positive", sa.Boolean, nullable=False, server_default=sa.true()),
)

role_inherits = sa.Table(
    "role_inherits",
    metadata,
    sa.Column("role_id", sa.ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("parent_id", sa.ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True),
)

admin_roles = sa.Table(
    "admin_roles",
    metadata,
    sa.Column("admin_id", sa.ForeignKey("administrators.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("role_id", sa.ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True),
)

login_failures = sa.Table(
    "login_failures",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),  # "admin:<tenant>/<name>" or "source:<address>"
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("first_at", TS, nullable=False),
    sa.Column("locked_until", TS, nullable=True),
)

# ---- activity: the farm's counts once a minute, for the dashboard's chart (services/activity.py) -------------

activity = sa.Table(
    "activity",
    metadata,
    sa.Column("at", TS, primary_key=True),  # the minute sampled
    # 0: the whole farm; a tenant's own row only in the minutes it had a desktop running or a user connected
    sa.Column("tenant_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("running", sa.Integer, nullable=False),  # desktops running
    sa.Column("connected", sa.Integer, nullable=False),  # users connected
    sa.Column("nodes", sa.Integer, nullable=False),  # nodes running (the farm's, in every row)
)

# ---- audit: every administrator action, hash-chained so tampering shows -------------------------------------

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", TS, nullable=False, index=True),
    sa.Column("admin_id", sa.Integer, nullable=True),
    sa.Column("admin_name", sa.String(64), nullable=False, server_default=""),
    sa.Column("tenant_id", sa.Integer, nullable=True, index=True),
    sa.Column("action", sa.String(128), nullable=False),  # e.g. desktop.start
    sa.Column("object_type", sa.String(32), nullable=False, server_default=""),
    sa.Column("object_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("arguments", sa.Text, nullable=False, server_default="{}"),  # JSON, secrets masked
    sa.Column("result", sa.String(16), nullable=False),  # ok | failed
    sa.Column("status", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error_code", sa.String(64), nullable=False, server_default=""),
    sa.Column("source", sa.String(64), nullable=False, server_default=""),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

# ---- custom properties on objects (QVD: *_properties) -------------------------------------------------------

properties = sa.Table(
    "properties",
    metadata,
    sa.Column("object_type", sa.String(32), primary_key=True),  # user | desktop | osf | image | node
    sa.Column("object_id", sa.Integer, primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# ---- indexes for admin lists: a filtered, sorted page of 20,000 desktops (bench/api_scale.py) ----------------

sa.Index("ix_desktops_name", desktops.c.name)
# ---- portal (0007): user sessions of the browser portal and one-time broker tickets ------------------------

tickets = sa.Table(
    "tickets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # sha256 hex of the secret
    sa.Column("kind", sa.String(16), nullable=False),  # portal (user session) | connect | spy
    sa.Column("user_id", sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True),
    sa.Column("admin_id", sa.ForeignKey("administrators.id", ondelete="CASCADE"), nullable=True),
    sa.Column("desktop_id", sa.ForeignKey("desktops.id", ondelete="CASCADE"), nullable=True),
    sa.Column("interactive", sa.Boolean, nullable=False, server_default=sa.false()),  # spy may send input
    sa.Column("created_at", TS, nullable=False),
    sa.Column("expires_at", TS, nullable=False, index=True),
    sa.Column("used_at", TS, nullable=True),  # connect/spy tickets: redeemed (single use)
)

sa.Index("ix_desktops_created_at", desktops.c.created_at)
sa.Index("ix_desktops_state_name", desktops.c.state, desktops.c.name)
sa.Index("ix_desktops_osf_state_name", desktops.c.osf_id, desktops.c.state, desktops.c.name)
sa.Index("ix_users_login", users.c.login)
sa.Index("ix_connections_user_started", connections.c.user_id, connections.c.started_at)


# ---- identity (0009): second factors, recovery codes, users' personal tokens, single sign-on flows ----------
# ``principal`` is "user" or "admin" and ``principal_id`` the row in users or administrators: both kinds of
# account enrol the same way, so one table serves them (rows go with the account: services delete them).

second_factors = sa.Table(
    "second_factors",
    metadata,
    sa.Column("principal", sa.String(8), primary_key=True),
    sa.Column("principal_id", sa.Integer, primary_key=True),
    sa.Column("secret", sa.String(64), nullable=False),  # base32 TOTP secret
    sa.Column("created_at", TS, nullable=False),
    sa.Column("confirmed_at", TS, nullable=True),  # NULL: enrolment started, not yet confirmed with a first code
    sa.Column("last_step", sa.Integer, nullable=False, server_default="0"),  # newest 30 s step used: no replay
)

recovery_codes = sa.Table(
    "recovery_codes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("principal", sa.String(8), nullable=False),
    sa.Column("principal_id", sa.Integer, nullable=False),
    sa.Column("code_hash", sa.String(64), nullable=False),  # sha256 hex of the code (random, 60 bits)
    sa.Column("used_at", TS, nullable=True),
    sa.Index("ix_recovery_codes_principal", "principal", "principal_id"),
)

user_tokens = sa.Table(
    "user_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # sha256 hex of the secret
    sa.Column("created_at", TS, nullable=False),
    sa.Column("expires_at", TS, nullable=False),  # personal tokens always expire
    sa.Column("last_used_at", TS, nullable=True),
    sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.UniqueConstraint("user_id", "name", name="uq_user_tokens_user_id"),
)

sso_flows = sa.Table(
    "sso_flows",
    metadata,
    sa.Column("state_hash", sa.String(64), primary_key=True),  # sha256 hex of the OAuth ``state``
    sa.Column("tenant_id", sa.Integer, nullable=False),
    sa.Column("audience", sa.String(8), nullable=False),  # portal | wat
    sa.Column("flow", sa.Text, nullable=False),  # JSON: nonce, PKCE verifier, redirect URI (never sent out)
    sa.Column("created_at", TS, nullable=False),
    sa.Column("expires_at", TS, nullable=False, index=True),
)

# ---- volumes (0012): block volumes a tenant makes and attaches to its desktops ------------------------------
# A volume is a disk file in the storage root (``drivers/volumes.py``); ``state`` is ``creating`` while its file
# is being made (a failed create removes the row again) and ``ready`` after.

volumes = sa.Table(
    "volumes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.ForeignKey("tenants.id", ondelete="RESTRICT"), nullable=False, index=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("size_gib", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, server_default="creating"),
    sa.Column("status_message", sa.Text, nullable=False, server_default=""),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("tenant_id", "name", name="uq_volumes_tenant_name"),
)

volume_snapshots = sa.Table(
    "volume_snapshots",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("volume_id", sa.ForeignKey("volumes.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("size_gib", sa.Integer, nullable=False),  # the volume's size when the snapshot was taken
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("volume_id", "name", name="uq_volume_snapshots_volume_name"),
)

# desired state (API): which desktop has which volume, read-only or not.  ``pending`` asks the node that runs the
# desktop to hot-plug (``attach``) or unplug (``detach``) it; the node clears it, or sets ``failed`` with
# ``error_code``/``error`` (``volume_held`` …), which the waiting API call reports.  ``plugged``: the guest
# had the volume when the node last acted (meaningful while the desktop runs).
volume_attachments = sa.Table(
    "volume_attachments",
    metadata,
    sa.Column("volume_id", sa.ForeignKey("volumes.id", ondelete="RESTRICT"), primary_key=True),
    sa.Column("desktop_id", sa.ForeignKey("desktops.id", ondelete="CASCADE"), primary_key=True, index=True),
    sa.Column("read_only", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("attached_at", TS, nullable=False),
    sa.Column("pending", sa.String(8), nullable=True),  # attach | detach | failed
    sa.Column("plugged", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("error_code", sa.String(32), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
)

# warm pools (0016, docs/pools.md): per OSF and image tag, how many warm guests the farm keeps ready, and those
# guests (a taken one leaves the table: its desktop's ``guest`` names it from then on)
warm_pools = sa.Table(
    "warm_pools",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("osf_id", sa.ForeignKey("osfs.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("tag", sa.String(64), nullable=False, server_default="default"),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("hours", sa.Text, nullable=False, server_default=""),  # login rules' windows; "": always
    sa.Column("timezone", sa.String(64), nullable=False, server_default="UTC"),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),  # why its last warm guest failed to start
    sa.Column("last_error_at", TS, nullable=True),
    sa.UniqueConstraint("osf_id", "tag", name="uq_warm_pools_osf_tag"),
)
warm_guests = sa.Table(
    "warm_guests",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("pool_id", sa.ForeignKey("warm_pools.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("node_id", sa.ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("image_id", sa.Integer, nullable=False),
    sa.Column("ip", sa.String(45), nullable=False, unique=True),  # from the farm range, never a desktop's
    sa.Column("agent_token", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # starting | ready
    sa.Column("created_at", TS, nullable=False),
)
