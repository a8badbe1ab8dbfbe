"""node fence agent: how another node powers this one off when it is lost

Revision ID: 0014
Revises: 0013

A lost node must be fenced by one of the *other* nodes before its desktops are released, so the way to fence it
(a fence agent of the ClusterLabs fence agent API, e.g. ``fence_ipmilan``, and the options it reads on its
standard input) is kept in its row, where every monitor can read it.  ``fence_agent`` "" keeps the farm's
default fencing (``node.fencing``: local or command).  ``fence_tried_at`` is the last attempt, so that one
monitor, not every node's, retries a failed fence once per ``node.fence_retry_s``.
"""

from alembic import op
import sqlalchemy as sa


revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fence_agent", sa.String(64), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("fence_options", sa.Text(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("fence_tried_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_column("fence_tried_at")
        batch_op.drop_column("fence_options")
        batch_op.drop_column("fence_agent")
