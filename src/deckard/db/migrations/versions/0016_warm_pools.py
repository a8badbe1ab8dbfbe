"""warm pools: desktops started before anyone asks, which a connecting user takes over

Revision ID: 0016
Revises: 0015

``warm_pools`` says, per OSF and image tag, how many warm guests the farm keeps ready (always, or within hours in
a time zone); ``warm_guests`` are those guests, each on one node with an address of the farm range and its agent's
token.  A desktop that takes one over names it in ``desktops.guest`` until it stops (the row leaves
``warm_guests``: a guest serves one desktop once).
"""

from alembic import op
import sqlalchemy as sa


revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "warm_pools",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("osf_id", sa.Integer(), nullable=False),
        sa.Column("tag", sa.String(length=64), server_default="default", nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("hours", sa.Text(), server_default="", nullable=False),
        sa.Column("timezone", sa.String(length=64), server_default="UTC", nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_at", TS, nullable=True),
        sa.ForeignKeyConstraint(["osf_id"], ["osfs.id"], name="fk_warm_pools_osf_id_osfs", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_warm_pools"),
        sa.UniqueConstraint("osf_id", "tag", name="uq_warm_pools_osf_tag"),
    )
    op.create_index("ix_warm_pools_osf_id", "warm_pools", ["osf_id"])
    op.create_table(
        "warm_guests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pool_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("ip", sa.String(length=45), nullable=False),
        sa.Column("agent_token", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["pool_id"], ["warm_pools.id"], name="fk_warm_guests_pool_id_warm_pools", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name="fk_warm_guests_node_id_nodes", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_warm_guests"),
        sa.UniqueConstraint("name", name="uq_warm_guests_name"),
        sa.UniqueConstraint("ip", name="uq_warm_guests_ip"),
    )
    op.create_index("ix_warm_guests_pool_id", "warm_guests", ["pool_id"])
    op.create_index("ix_warm_guests_node_id", "warm_guests", ["node_id"])
    with op.batch_alter_table("desktops", schema=None) as batch_op:
        batch_op.add_column(sa.Column("guest", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("desktops", schema=None) as batch_op:
        batch_op.drop_column("guest")
    op.drop_index("ix_warm_guests_node_id", table_name="warm_guests")
    op.drop_index("ix_warm_guests_pool_id", table_name="warm_guests")
    op.drop_table("warm_guests")
    op.drop_index("ix_warm_pools_osf_id", table_name="warm_pools")
    op.drop_table("warm_pools")
