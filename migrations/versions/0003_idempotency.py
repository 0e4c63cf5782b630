"""idempotency and reuse

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 06:43:34.004994
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("idempotency_key", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("request_fingerprint", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("reused_from", sa.Uuid(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_jobs_request_fingerprint"), ["request_fingerprint"], unique=False
        )
        batch_op.create_unique_constraint(
            batch_op.f("uq_jobs_idempotency_key"), ["idempotency_key"]
        )


def downgrade() -> None:

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_jobs_idempotency_key"), type_="unique")
        batch_op.drop_index(batch_op.f("ix_jobs_request_fingerprint"))
        batch_op.drop_column("reused_from")
        batch_op.drop_column("request_fingerprint")
        batch_op.drop_column("idempotency_key")
