"""ORM models: the tables of docs/service-design.md. Every schema change needs an Alembic revision."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so migrations can drop what they created on every database.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_STATUSES = ("queued", "running", "evaluating", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


ROW_ID = re.compile(r"^[0-9a-f]{32}$")  # what new_id makes: a malformed id never reaches the database


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no offset, so add it back on read)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC times")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON(), str: sa.String(255)}


IdStr = sa.String(32)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(IdStr, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(IdStr, primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(IdStr, sa.ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(sa.String(16), index=True)
    key_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Teacher(Base):
    __tablename__ = "teachers"

    id: Mapped[str] = mapped_column(IdStr, primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(IdStr, sa.ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str]
    format: Mapped[str] = mapped_column(sa.String(32))
    arch: Mapped[str | None] = mapped_column(sa.String(64))
    num_classes: Mapped[int]
    normalize: Mapped[dict[str, Any] | None]
    sha256: Mapped[str] = mapped_column(sa.String(64))
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    num_params: Mapped[int] = mapped_column(sa.BigInteger)
    probe: Mapped[dict[str, Any]]
    object_key: Mapped[str] = mapped_column(sa.String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def normalize_spec(self) -> str | None:
        """``normalize`` ({"mean": [...], "std": [...]}) in the "m1,m2,m3;s1,s2,s3" form core parses."""
        if not self.normalize or not self.normalize.get("mean") or not self.normalize.get("std"):
            return None
        return ";".join(",".join(repr(float(v)) for v in self.normalize[k]) for k in ("mean", "std"))


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(IdStr, primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(IdStr, sa.ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str]
    num_classes: Mapped[int]
    n_train: Mapped[int]
    n_test: Mapped[int]
    sha256: Mapped[str] = mapped_column(sa.String(64))
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    object_key: Mapped[str] = mapped_column(sa.String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "idempotency_key"),
        sa.Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(IdStr, primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(IdStr, sa.ForeignKey("tenants.id", ondelete="CASCADE"))
    # A teacher or dataset may be deleted once its jobs are finished; the job keeps its record (the API
    # clears these ids first). No ON DELETE action: the database refuses to delete a teacher or dataset
    # that a job still names, so a job created during the delete never loses it (api/routes/teachers.py).
    teacher_id: Mapped[str | None] = mapped_column(IdStr, sa.ForeignKey("teachers.id"), index=True)
    dataset_name: Mapped[str | None] = mapped_column(sa.String(64))
    dataset_id: Mapped[str | None] = mapped_column(IdStr, sa.ForeignKey("datasets.id"), index=True)
    student_arch: Mapped[str] = mapped_column(sa.String(64))
    method: Mapped[str] = mapped_column(sa.String(64))
    params: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(sa.String(16), default="queued", index=True)
    error: Mapped[str | None] = mapped_column(sa.Text)
    progress: Mapped[dict[str, Any] | None]
    latest_metrics: Mapped[dict[str, Any] | None]
    idempotency_key: Mapped[str | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(default=0)
    # Apart from ``attempts`` (deliveries that started running, the lease's fencing token): attempts lost
    # with their worker (not the job's fault, RD_MAX_LOST_WORKERS) and attempts that ended in the job's
    # own unexpected error and were retried (RD_MAX_ATTEMPTS). See worker/lease.py.
    lost_workers: Mapped[int] = mapped_column(default=0, server_default="0")
    failed_attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    # When a message for the job was last sent: a job queued longer than RD_REQUEUE_QUEUED_AFTER_S is
    # sent again (the broker may have lost it), and this marker keeps that to once per period.
    enqueued_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Guardrails (core/guardrails.py, migration 0003): the job's warnings as the API shows them, the
    # teacher's clean accuracy measured before training, and a degenerate student kept on request.
    warnings: Mapped[list[str] | None] = mapped_column(sa.JSON)
    teacher_accuracy: Mapped[float | None] = mapped_column(sa.Float)
    degenerate_student: Mapped[bool] = mapped_column(default=False, server_default=sa.false())

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (
        sa.UniqueConstraint("job_id", "dedupe_key"),
        sa.Index("ix_job_events_job_id_id", "job_id", "id"),
    )

    # BIGINT on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(IdStr, sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(sa.String(32))
    payload: Mapped[dict[str, Any]]
    dedupe_key: Mapped[str | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobMetric(Base):
    __tablename__ = "job_metrics"

    job_id: Mapped[str] = mapped_column(IdStr, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    metrics: Mapped[dict[str, Any]]


class Artifact(Base):
    __tablename__ = "artifacts"

    job_id: Mapped[str] = mapped_column(IdStr, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    object_key: Mapped[str] = mapped_column(sa.String(512))
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
