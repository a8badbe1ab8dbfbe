"""identity: directory and SSO accounts, second factors, recovery codes, personal tokens, SSO flows

Revision ID: 0009
Revises: 0008

Users and administrators learn where they came from (``origin``: local, ldap, oidc) and what the directory said
of them; an administrator from a directory has no password here (``password_hash`` becomes nullable).  Users get
their own login rules (source networks, hours).  New tables: ``second_factors`` and ``recovery_codes`` (TOTP, for
users and administrators alike), ``user_tokens`` (named, expiring personal tokens) and ``sso_flows`` (the
server-side half of an OpenID Connect login in progress).
"""

from alembic import op
import sqlalchemy as sa


revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("origin", sa.String(length=16), server_default="local", nullable=False))
        batch_op.add_column(sa.Column("external_id", sa.String(length=255), server_default="", nullable=False))
        batch_op.add_column(sa.Column("display_name", sa.String(length=128), server_default="", nullable=False))
        batch_op.add_column(sa.Column("mail", sa.String(length=254), server_default="", nullable=False))
        batch_op.add_column(sa.Column("allowed_networks", sa.Text(), server_default="", nullable=False))
        batch_op.add_column(sa.Column("allowed_hours", sa.Text(), server_default="", nullable=False))
    with op.batch_alter_table("administrators", schema=None) as batch_op:
        batch_op.alter_column("password_hash", existing_type=sa.Text(), nullable=True)
        batch_op.add_column(sa.Column("origin", sa.String(length=16), server_default="local", nullable=False))
    op.create_table(
        "second_factors",
        sa.Column("principal", sa.String(length=8), nullable=False),
        sa.Column("principal_id", sa.Integer(), nullable=False),
        sa.Column("secret", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("confirmed_at", TS, nullable=True),
        sa.Column("last_step", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("principal", "principal_id", name=op.f("pk_second_factors")),
    )
    op.create_table(
        "recovery_codes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("principal", sa.String(length=8), nullable=False),
        sa.Column("principal_id", sa.Integer(), nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("used_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recovery_codes")),
    )
    op.create_index("ix_recovery_codes_principal", "recovery_codes", ["principal", "principal_id"])
    op.create_table(
        "user_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        sa.Column("revoked", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_user_tokens_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_user_tokens_token_hash")),
        sa.UniqueConstraint("user_id", "name", name="uq_user_tokens_user_id"),
    )
    op.create_index(op.f("ix_user_tokens_user_id"), "user_tokens", ["user_id"])
    op.create_table(
        "sso_flows",
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("audience", sa.String(length=8), nullable=False),
        sa.Column("flow", sa.Text(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("state_hash", name=op.f("pk_sso_flows")),
    )
    op.create_index(op.f("ix_sso_flows_expires_at"), "sso_flows", ["expires_at"])


def downgrade() -> None:
    for table in ("sso_flows", "user_tokens", "recovery_codes", "second_factors"):
        op.drop_table(table)
    with op.batch_alter_table("administrators", schema=None) as batch_op:
        batch_op.drop_column("origin")
        batch_op.alter_column("password_hash", existing_type=sa.Text(), nullable=False)
    with op.batch_alter_table("users", schema=None) as batch_op:
        for column in ("allowed_hours", "allowed_networks", "mail", "display_name", "external_id", "origin"):
            batch_op.drop_column(column)
