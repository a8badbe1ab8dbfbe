"""indexes for admin lists of desktops, users and connections

Revision ID: 0004
Revises: 0002
"""

from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None

INDEXES = [
    ("ix_desktops_name", "desktops", ["name"]),
    ("ix_desktops_created_at", "desktops", ["created_at"]),
    ("ix_desktops_state_name", "desktops", ["state", "name"]),
    ("ix_desktops_osf_state_name", "desktops", ["osf_id", "state", "name"]),
    ("ix_users_login", "users", ["login"]),
    ("ix_connections_user_started", "connections", ["user_id", "started_at"]),
]


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns, unique=False)


def downgrade() -> None:
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table)
