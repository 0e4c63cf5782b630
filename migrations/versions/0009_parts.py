"""jobs of many parts: batches, videos and their runs of frames; the temporal loss

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 07:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), server_default="picture", nullable=False)
        )
        batch_op.add_column(sa.Column("parent_id", sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column("part_index", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("frames", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("media", sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_parent_id"), ["parent_id"], unique=False)
        batch_op.create_foreign_key(
            "fk_jobs_parent_id_jobs", "jobs", ["parent_id"], ["id"], ondelete="CASCADE"
        )
    with op.batch_alter_table("loss_points", schema=None) as batch_op:
        batch_op.add_column(sa.Column("temporal", sa.Float(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("loss_points", schema=None) as batch_op:
        batch_op.drop_column("temporal")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("fk_jobs_parent_id_jobs", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_jobs_parent_id"))
        batch_op.drop_column("media")
        batch_op.drop_column("frames")
        batch_op.drop_column("part_index")
        batch_op.drop_column("parent_id")
        batch_op.drop_column("kind")
