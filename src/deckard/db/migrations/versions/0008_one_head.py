"""merge the four schema branches that grew from 0002 into one head

Revision ID: 0008
Revises: 0003, 0004, 0006, 0007

The user home key, desktops, farm and tickets revisions were written in parallel on top of 0002, so the
schema had four heads and the farm upgraded with ``heads``.  This revision changes nothing; it joins them,
so ``alembic heads`` shows one head and every later revision has one parent.
"""

revision = "0008"
down_revision = ("0003", "0004", "0006", "0007")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
