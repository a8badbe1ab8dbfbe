"""activity: the farm's counts once a minute, for the dashboard's chart

Revision ID: 0019
Revises: 0018

One node samples each minute (``services/activity.py``): desktops running, users connected and nodes running, for
the whole farm (``tenant_id`` 0) and for each tenant that had a desktop running or a user connected.  Kept 8 days.
"""

from alembic import op
import sqlalchemy as sa


revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "activity",
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("running", sa.Integer(), nullable=False),
        sa.Column("connected", sa.Integer(), nullable=False),
        sa.Column("nodes", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("at", "tenant_id", name=op.f("pk_activity")),
    )


def downgrade() -> None:
    op.drop_table("activity")
