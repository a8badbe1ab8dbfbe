"""connection image and node: which disk image and which node served each connection

Revision ID: 0013
Revises: 0012

The connection history already times every phase of time-to-desktop; ``image_id`` and ``node_id`` say where
the desktop ran, so the dashboard can show the phases per image and per node (``GET /stats/time-to-desktop``).
Both are NULL for the rows written before this revision and for connections that never reached their
desktop's display; they are indexed because deleting a node or an image sets them to NULL (without an index
the database would scan the whole history for it).
"""

from alembic import op
import sqlalchemy as sa


revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("connections", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("node_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            "fk_connections_image_id_disk_images", "disk_images", ["image_id"], ["id"], ondelete="SET NULL"
        )
        batch_op.create_foreign_key("fk_connections_node_id_nodes", "nodes", ["node_id"], ["id"], ondelete="SET NULL")
        batch_op.create_index("ix_connections_image_id", ["image_id"])
        batch_op.create_index("ix_connections_node_id", ["node_id"])


def downgrade() -> None:
    with op.batch_alter_table("connections", schema=None) as batch_op:
        batch_op.drop_index("ix_connections_node_id")
        batch_op.drop_index("ix_connections_image_id")
        batch_op.drop_constraint("fk_connections_node_id_nodes", type_="foreignkey")
        batch_op.drop_constraint("fk_connections_image_id_disk_images", type_="foreignkey")
        batch_op.drop_column("node_id")
        batch_op.drop_column("image_id")
