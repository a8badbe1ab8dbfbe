"""users.home_key: homes are keyed per account, not by login

Revision ID: 0003
Revises: 0002

Users that exist at the upgrade keep their home where it is (``homes/<tenant>/<login>``: the key is the login);
every user created afterwards gets a random key (``<login>+<hex>``, db/schema.py), so a new account with an old
login never finds the files of a deleted one.
"""

from alembic import op
import sqlalchemy as sa


revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("home_key", sa.String(length=80), server_default="", nullable=False))
    op.execute("UPDATE users SET home_key = login")


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("home_key")
