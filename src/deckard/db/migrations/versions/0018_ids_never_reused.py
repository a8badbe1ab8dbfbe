"""ids never reused: SQLite's ``AUTOINCREMENT`` for users and desktops

Revision ID: 0018
Revises: 0017

A user's id is their Unix uid in every desktop (``entities.uid_for_user``) and a desktop's names its guest and its
writable layer (``FarmPaths.overlay``).  SQLite gives a deleted newest row's id to the next row made, so a new
account could get a deleted one's uid (its files on volumes and in layers) and a new desktop a deleted one's layer
and audit history.  ``AUTOINCREMENT`` makes SQLite hand out ids above every id it ever gave (PostgreSQL's sequences
already do: nothing to change there).  The two tables are rebuilt (batch mode, without ``PRAGMA foreign_keys``, so
the rows that refer to them stay); the counter starts above the highest id they hold at the upgrade.
"""

from alembic import op


revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

TABLES = ("users", "desktops")


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
            pass


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
