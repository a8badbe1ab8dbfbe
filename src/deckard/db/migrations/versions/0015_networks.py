"""networks: tenant networks, their grants, and the network of each OSF and desktop

Revision ID: 0015
Revises: 0014

A tenant may have networks of its own (``private``) and use the farm's ``shared`` networks it was granted (or its
``flat`` ones: a network of the machines' own, on a node interface, optionally VLAN-tagged), so
desktops of two tenants may have the same address on different networks.  A desktop on a network keeps its farm
address (``desktops.ip``, unique in the farm: how nodes and brokers reach it) and gets an address in the network
(``desktops.network_ip``, unique in that network: what the guest sees), which its node maps to the farm address.
``osfs.network_id`` and ``desktops.network_id`` NULL keep every existing OSF and desktop on the farm's default
network (``network.range``), as before.

SQLite cannot add a foreign key or a check in place, so ``osfs`` and ``desktops`` are rebuilt (batch mode); the
migration runs without ``PRAGMA foreign_keys``, so the rows that refer to them (connections, tickets, attachments,
images) stay.
"""

from alembic import op
import sqlalchemy as sa


revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "networks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("range", sa.String(length=18), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("interface", sa.String(length=15), nullable=True),
        sa.Column("vlan", sa.Integer(), nullable=True),
        sa.Column("gateway", sa.String(length=15), nullable=True),
        sa.CheckConstraint(
            "(kind = 'private' AND tenant_id IS NOT NULL) OR (kind IN ('shared', 'flat') AND tenant_id IS NULL)",
            name="ck_networks_kind",
        ),
        sa.CheckConstraint("(kind = 'flat') = (interface IS NOT NULL)", name="ck_networks_flat"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_networks_tenant_id_tenants", ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_networks"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_networks_tenant_name"),
    )
    op.create_index("ix_networks_tenant_id", "networks", ["tenant_id"])
    op.create_table(
        "network_grants",
        sa.Column("network_id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["network_id"], ["networks.id"], name="fk_network_grants_network_id_networks", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_network_grants_tenant_id_tenants", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("network_id", "tenant_id", name="pk_network_grants"),
    )
    op.create_index("ix_network_grants_tenant_id", "network_grants", ["tenant_id"])
    with op.batch_alter_table("osfs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("network_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            "fk_osfs_network_id_networks", "networks", ["network_id"], ["id"], ondelete="RESTRICT"
        )
        batch_op.create_index("ix_osfs_network_id", ["network_id"])
    with op.batch_alter_table("desktops", schema=None) as batch_op:
        batch_op.add_column(sa.Column("network_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("network_ip", sa.String(length=45), nullable=True))
        batch_op.create_foreign_key(
            "fk_desktops_network_id_networks", "networks", ["network_id"], ["id"], ondelete="RESTRICT"
        )
        batch_op.create_check_constraint("ck_desktops_network_ip", "(network_id IS NULL) = (network_ip IS NULL)")
        batch_op.create_index("ix_desktops_network_id", ["network_id"])
        batch_op.create_index("ux_desktops_network_ip", ["network_id", "network_ip"], unique=True)
        # a node on a farm across machines reads the desktops whose state changed since its last look
        batch_op.create_index("ix_desktops_state_at", ["state_at"])


def downgrade() -> None:
    with op.batch_alter_table("desktops", schema=None) as batch_op:
        batch_op.drop_index("ix_desktops_state_at")
        batch_op.drop_index("ux_desktops_network_ip")
        batch_op.drop_index("ix_desktops_network_id")
        batch_op.drop_constraint("ck_desktops_network_ip", type_="check")
        batch_op.drop_constraint("fk_desktops_network_id_networks", type_="foreignkey")
        batch_op.drop_column("network_ip")
        batch_op.drop_column("network_id")
    with op.batch_alter_table("osfs", schema=None) as batch_op:
        batch_op.drop_index("ix_osfs_network_id")
        batch_op.drop_constraint("fk_osfs_network_id_networks", type_="foreignkey")
        batch_op.drop_column("network_id")
    op.drop_index("ix_network_grants_tenant_id", table_name="network_grants")
    op.drop_table("network_grants")
    op.drop_index("ix_networks_tenant_id", table_name="networks")
    op.drop_table("networks")
