"""the display before the agent: when a starting desktop's user display came up at boot

Revision ID: 0017
Revises: 0016

``desktops.display_at`` is set by the node once it has launched a guest whose init starts the user's display
itself (a container's boot script): from then on the broker may dial that display while the guest's agent is still
starting.  A start's claim clears it.
"""

from alembic import op
import sqlalchemy as sa


revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("desktops", schema=None) as batch_op:
        batch_op.add_column(sa.Column("display_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("desktops", schema=None) as batch_op:
        batch_op.drop_column("display_at")
