"""client

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 06:56:57.090973
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("client", sa.String(length=200), nullable=True))
        batch_op.create_index("ix_jobs_client_status", ["client", "status"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_client_status")
        batch_op.drop_column("client")
