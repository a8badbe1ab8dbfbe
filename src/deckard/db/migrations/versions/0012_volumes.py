"""volumes: block volumes of a tenant, their snapshots, and their attachments to desktops

Revision ID: 0012
Revises: 0011

``volumes`` are disk files in the storage root (``drivers/volumes.py``), ``volume_snapshots`` the internal
snapshots inside them, ``volume_attachments`` which desktop has which volume (read-only or not) and what the
node running it has still to do (``pending``).  A volume has at most one read-write attachment and never one
beside read-only ones: the services keep that rule (docs/volumes.md).
"""

from alembic import op
import sqlalchemy as sa


revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "volumes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("size_gib", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), server_default="creating", nullable=False),
        sa.Column("status_message", sa.Text(), server_default="", nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_volumes_tenant_id_tenants", ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_volumes"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_volumes_tenant_name"),
    )
    op.create_index("ix_volumes_tenant_id", "volumes", ["tenant_id"])
    op.create_table(
        "volume_snapshots",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("volume_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("size_gib", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["volume_id"], ["volumes.id"], name="fk_volume_snapshots_volume_id_volumes", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_volume_snapshots"),
        sa.UniqueConstraint("volume_id", "name", name="uq_volume_snapshots_volume_name"),
    )
    op.create_index("ix_volume_snapshots_volume_id", "volume_snapshots", ["volume_id"])
    op.create_table(
        "volume_attachments",
        sa.Column("volume_id", sa.Integer(), nullable=False),
        sa.Column("desktop_id", sa.Integer(), nullable=False),
        sa.Column("read_only", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("attached_at", TS, nullable=False),
        sa.Column("pending", sa.String(length=8), nullable=True),
        sa.Column("plugged", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("error_code", sa.String(length=32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["volume_id"], ["volumes.id"], name="fk_volume_attachments_volume_id_volumes", ondelete="RESTRICT"
        ),
        sa.ForeignKeyConstraint(
            ["desktop_id"], ["desktops.id"], name="fk_volume_attachments_desktop_id_desktops", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("volume_id", "desktop_id", name="pk_volume_attachments"),
    )
    op.create_index("ix_volume_attachments_desktop_id", "volume_attachments", ["desktop_id"])


def downgrade() -> None:
    op.drop_table("volume_attachments")
    op.drop_table("volume_snapshots")
    op.drop_table("volumes")
