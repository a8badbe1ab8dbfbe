"""user ssh keys: the public SSH keys guests learn from the metadata service

Revision ID: 0011
Revises: 0010

``users.ssh_keys`` holds a user's public SSH keys as a JSON list of ``authorized_keys`` lines (checked by
``model/guest_metadata.py`` before they are stored); the metadata service hands them to the user's desktops.
"""

from alembic import op
import sqlalchemy as sa


revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ssh_keys", sa.Text(), server_default="[]", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("ssh_keys")
