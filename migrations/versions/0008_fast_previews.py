"""fast previews, fast jobs and the work estimate

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 22:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("mode", sa.String(length=16), server_default="optimize", nullable=False)
        )
        batch_op.add_column(sa.Column("preview_source", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("work", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("work")
        batch_op.drop_column("preview_source")
        batch_op.drop_column("mode")
