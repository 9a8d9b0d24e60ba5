"""recovery: count lost workers apart from the job's own failures; remember when a job was last enqueued

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # Attempts whose worker died (the reaper or a redelivery took over a stale lease).
        batch.add_column(sa.Column("lost_workers", sa.Integer(), nullable=False, server_default="0"))
        # Attempts that ended in the job's own unexpected error and were retried.
        batch.add_column(sa.Column("failed_attempts", sa.Integer(), nullable=False, server_default="0"))
        # When a message for this job was last sent; the reaper re-sends for a job queued too long.
        batch.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("enqueued_at")
        batch.drop_column("failed_attempts")
        batch.drop_column("lost_workers")
