"""farm: placement groups, node driver and run dir, lost-node bookkeeping

Revision ID: 0006
Revises: 0002
"""

from alembic import op
import sqlalchemy as sa


revision = "0006"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("desktops", schema=None) as batch_op:
        batch_op.add_column(sa.Column("placement_group", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("placement_policy", sa.String(length=16), nullable=True))
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("driver", sa.String(length=16), server_default="container", nullable=False))
        batch_op.add_column(sa.Column("run_dir", sa.Text(), server_default="", nullable=False))
        batch_op.add_column(sa.Column("boot_id", sa.String(length=64), server_default="", nullable=False))
        batch_op.add_column(sa.Column("lost_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("lost_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_column("lost_reason")
        batch_op.drop_column("lost_at")
        batch_op.drop_column("boot_id")
        batch_op.drop_column("run_dir")
        batch_op.drop_column("driver")
    with op.batch_alter_table("desktops", schema=None) as batch_op:
        batch_op.drop_column("placement_policy")
        batch_op.drop_column("placement_group")
