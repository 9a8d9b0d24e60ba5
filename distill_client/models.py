"""The API's request and response bodies: one definition, used by the server (``api.schemas`` re-exports
them, so the OpenAPI document is built from these classes) and by the client to type what it returns.

Pydantic only: nothing here imports the server (FastAPI, SQLAlchemy, torch). A response field the server
adds later is ignored by an older client (pydantic's default ``extra="ignore"``), so clients keep working
across additive API changes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

JobStatus = Literal["queued", "running", "evaluating", "succeeded", "failed", "cancelled"]
ModelFormat = Literal["auto", "torchscript", "export", "state_dict", "safetensors"]


class ErrorItem(BaseModel):
    """One bad field of a request."""

    loc: list[str | int] = Field(description="Where: location ('body', 'query', 'path', 'header') then keys")
    msg: str
    type: str = Field(description="A stable machine-readable kind, e.g. 'missing', 'int_parsing'")


class ErrorOut(BaseModel):
    """The one error body of the whole API (every 4xx and 5xx): ``detail`` is a sentence naming what to fix;
    ``errors`` lists the bad fields one by one when the request did not validate."""

    detail: str
    errors: list[ErrorItem] = Field(
        default_factory=list, description="The bad fields, on request-validation 422s (absent otherwise)"
    )


class Normalization(BaseModel):
    mean: list[float]
    std: list[float]


class TeacherOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    sha256: str
    size_bytes: int
    num_params: int
    format: str
    arch: str | None
    num_classes: int
    normalize: Normalization | None
    probe: dict[str, Any]
    created_at: datetime


class TeacherList(BaseModel):
    items: list[TeacherOut]


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    num_classes: int
    n_train: int
    n_test: int
    sha256: str
    size_bytes: int
    created_at: datetime


class BuiltinDataset(BaseModel):
    name: str
    num_classes: int
    available: bool
    note: str


class DatasetList(BaseModel):
    builtin: list[BuiltinDataset]
    uploaded: list[DatasetOut]


class StudentSpec(BaseModel):
    """One student of a several-student job."""

    model_config = ConfigDict(extra="forbid")

    student: str = Field(min_length=1, max_length=64, description="Student architecture")
    method: str = Field(min_length=1, max_length=64)
    method_params: dict[str, Any] = Field(default_factory=dict)
    name: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Prefix of this student's artifacts (default ARCH-METHOD)",
    )
    recipe: Literal["auto", "reference"] | None = Field(
        default=None, description="This student's recipe (default: the job's)"
    )


class JobCreate(BaseModel):
    """A distillation job. Omitted hyper-parameters take the method's reference values."""

    model_config = ConfigDict(extra="forbid")

    teacher_id: str | None = Field(default=None, description="Required by methods that distil from a teacher")
    student: str = Field(default="resnet18", min_length=1, max_length=64, description="Student architecture")
    method: str = Field(default="rslad", min_length=1, max_length=64)
    dataset: str = Field(min_length=1, max_length=64, description="A builtin dataset name or an uploaded id")
    epochs: int | None = Field(default=None, ge=1, le=1000)
    eps: float | None = Field(default=None, gt=0, le=0.5, description="L-inf radius for images in [0, 1]")
    batch_size: int = Field(default=128, ge=1, le=4096)
    train_subset: int | None = Field(default=None, ge=1)
    val_size: int = Field(default=1000, ge=0, le=1_000_000)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    method_params: dict[str, Any] = Field(default_factory=dict)
    attacks: list[str] | None = Field(default=None, min_length=1, max_length=16)
    n_eval: int | None = Field(default=None, ge=1)
    device: str = Field(default="auto", max_length=16)
    lr: float | None = Field(
        default=None, gt=0, le=10, description="Learning rate; default 0.1 x batch_size / 128 (linear rule)"
    )
    warmup_epochs: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Linear lr warm-up epochs; default off (min(5, epochs/10) when the linear rule raises "
        "the lr)",
    )
    recipe: Literal["auto", "reference"] = Field(
        default="auto",
        description="reference: the methods' published settings; auto: the same, adjusted for short runs "
        "(e.g. RSLAD's KL averaged over the batch below 100 epochs); explicit settings win",
    )
    teacher_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="The teacher's forward: auto = bf16 where native (with amp), else fp32"
    )
    collapse_patience: int = Field(
        default=3, ge=0, le=1000, description="Epochs at chance with a flat loss before a warning; 0: off"
    )
    allow_degenerate: bool = Field(
        default=False,
        description="Keep a student (or teacher) at chance level instead of failing; flagged as "
        "degenerate_student",
    )
    teacher_claimed_accuracy: float | None = Field(
        default=None, gt=0, le=1, description="The teacher's known clean accuracy (well below it: a warning)"
    )
    exports: list[Literal["safetensors", "torchscript", "export", "onnx"]] | None = Field(
        default=None,
        max_length=4,
        description="Formats the best and last students are exported to (default all four; [] none)",
    )
    students: list[StudentSpec] | None = Field(
        default=None,
        min_length=1,
        max_length=8,
        description="Several students trained in one pass over the data, sharing each teacher forward; "
        "replaces student / method / method_params. Artifacts: NAME.student_best.pt, NAME.student_last.pt, "
        "NAME.report.json and report.json",
    )


class Progress(BaseModel):
    """Where the job is. Training: epoch/epochs and step/steps. Evaluation (``phase`` 'evaluating'): which
    checkpoint under which attack, and ``done`` of ``total`` examples for it. ``fraction`` is the share of
    the current phase done; ``eta_s`` the seconds that phase has left at its rate so far."""

    phase: Literal["training", "evaluating"] | None = None
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    checkpoint: str | None = Field(default=None, description="'best' or 'last', while evaluating")
    attack: str | None = Field(default=None, description="The attack running, while evaluating")
    done: int | None = Field(default=None, description="Examples of the checkpoint done under the attack")
    total: int | None = Field(default=None, description="Examples the checkpoint is evaluated on")
    student: str | None = Field(default=None, description="Which student, in a several-student job")
    fraction: float | None = None
    eta_s: float | None = None

    @model_serializer(mode="wrap")
    def _known_only(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        """Only what the job has reported: a training job's progress carries no evaluation keys. (No return
        annotation: the document then shows the model's fields, not a bare object.)"""
        return {k: v for k, v in handler(self).items() if v is not None}


class JobOut(BaseModel):
    id: str
    status: JobStatus
    teacher_id: str | None
    student: str
    method: str
    dataset: str | None
    dataset_id: str | None
    params: dict[str, Any]
    progress: Progress
    latest_metrics: dict[str, Any] | None
    error: str | None
    cancel_requested: bool
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    warnings: list[str] = Field(
        default_factory=list, description="What the guardrails and the evaluation found (also job events)"
    )
    teacher_accuracy: float | None = Field(
        default=None, description="The teacher's clean accuracy measured before training (fraction)"
    )
    degenerate_student: bool = Field(
        default=False, description="The student is no better than guessing (kept because of allow_degenerate)"
    )


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page")


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    type: str
    payload: dict[str, Any]
    created_at: datetime


class EventPage(BaseModel):
    items: list[EventOut]
    next_after: int = Field(description="Pass as ?after= to read only newer events")


class MetricOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int
    metrics: dict[str, Any]


class MetricList(BaseModel):
    items: list[MetricOut]


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    size_bytes: int
    sha256: str
    created_at: datetime


class ArtifactList(BaseModel):
    items: list[ArtifactOut]


class DownloadUrl(BaseModel):
    url: str
    expires_in: int | None = Field(description="Seconds the URL stays valid; null for an API URL")


TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


# ---------------------------------------------------------------- the report (client side only)
# GET /v1/jobs/{id}/report answers the report.json the job wrote, whose content grows with the core
# library; the API document gives it no schema. These classes type the parts a client reads and keep
# every other key (``extra="allow"``: ``report.model_extra`` or ``report.model_dump()`` has them all).


class AttackResult(BaseModel):
    """One row of an evaluation: the accuracy under one attack."""

    model_config = ConfigDict(extra="allow")

    attack: str
    accuracy: float | None = None
    n: int | None = Field(default=None, description="Examples evaluated")
    ci95: list[float] | None = Field(default=None, description="The accuracy's 95% Wilson interval [lo, hi]")
    worst_class: dict[str, Any] | None = Field(
        default=None, description="The class with the lowest accuracy: {class, accuracy, n, correct, ci95}"
    )


class CheckpointResult(BaseModel):
    """The evaluation of one checkpoint ('best' or 'last')."""

    model_config = ConfigDict(extra="allow")

    epoch: int | None = None
    rows: list[AttackResult] = Field(default_factory=list)


class Report(BaseModel):
    """A job's report.json. A several-student job's report has ``students`` (name -> that student's
    report) instead of ``final``."""

    model_config = ConfigDict(extra="allow")

    final: dict[str, CheckpointResult] | None = None
    students: dict[str, Report] | None = None
    comparisons: dict[str, Any] | None = Field(
        default=None, description="Several students: each against the reference student, McNemar's exact test"
    )
    warnings: list[str] = Field(default_factory=list)
    degenerate_student: bool | None = None
    config: dict[str, Any] | None = None
    teacher: dict[str, Any] | None = None
    dataset: dict[str, Any] | None = None
    history: list[dict[str, Any]] | None = None
    resumed_from_epoch: int | None = None
    seconds: float | None = None
