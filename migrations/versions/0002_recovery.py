"""recovery: count lost workers apart from the job's own failures; remember when a job was last enqueued;
a teacher or dataset that an unfinished job uses cannot be deleted (the foreign keys no longer SET NULL)

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
        # NO ACTION instead of SET NULL: deleting a teacher or dataset that a job still names fails in the
        # database, so a job created while its teacher is deleted can never lose it. The API clears the
        # reference of finished jobs itself before deleting (they keep their record, as before).
        _refk(batch, None)


def _refk(batch: object, ondelete: str | None) -> None:
    for column, table in (("teacher_id", "teachers"), ("dataset_id", "datasets")):
        name = op.f(f"fk_jobs_{column}_{table}")
        batch.drop_constraint(name, type_="foreignkey")  # type: ignore[attr-defined]
        batch.create_foreign_key(name, table, [column], ["id"], ondelete=ondelete)  # type: ignore[attr-defined]


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        _refk(batch, "SET NULL")
        batch.drop_column("enqueued_at")
        batch.drop_column("failed_attempts")
        batch.drop_column("lost_workers")
