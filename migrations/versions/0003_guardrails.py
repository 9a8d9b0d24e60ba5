"""guardrails: a job's warnings, its teacher's measured clean accuracy and the degenerate-student flag

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # The warnings the worker recorded (the same messages as the job's warning events), in order.
        batch.add_column(sa.Column("warnings", sa.JSON(), nullable=True))
        # The teacher's clean accuracy on the check images, measured before training.
        batch.add_column(sa.Column("teacher_accuracy", sa.Float(), nullable=True))
        # A student no better than guessing, kept because the job set allow_degenerate.
        batch.add_column(
            sa.Column("degenerate_student", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("degenerate_student")
        batch.drop_column("teacher_accuracy")
        batch.drop_column("warnings")
