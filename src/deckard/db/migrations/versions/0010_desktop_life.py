"""desktop life: configuration per OSF, image profiles, what the agent saw of the user's input

Revision ID: 0010
Revises: 0009

``osf_config`` is the last layer of the layered configuration (default → global → tenant → OSF) for the keys
that may differ per OSF (egress policy, session policies).  Disk images remember the build profile they were
made from (``minimal``, ``standard``, an administrator's own).  Desktops learn when their user last touched
keyboard or mouse (``input_at``, reported by the agent) and when they were warned that they are idle.
"""

from alembic import op
import sqlalchemy as sa


revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "osf_config",
        sa.Column("osf_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["osf_id"], ["osfs.id"], name=op.f("fk_osf_config_osf_id_osfs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("osf_id", "key", name=op.f("pk_osf_config")),
    )
    with op.batch_alter_table("disk_images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("profile", sa.String(length=32), server_default="", nullable=False))
    with op.batch_alter_table("desktops", schema=None) as batch_op:
        batch_op.add_column(sa.Column("input_at", TS, nullable=True))
        batch_op.add_column(sa.Column("idle_warned_at", TS, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("desktops", schema=None) as batch_op:
        batch_op.drop_column("idle_warned_at")
        batch_op.drop_column("input_at")
    with op.batch_alter_table("disk_images", schema=None) as batch_op:
        batch_op.drop_column("profile")
    op.drop_table("osf_config")
