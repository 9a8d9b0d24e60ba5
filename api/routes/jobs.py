"""Jobs: create (checked against the core registries before anything is queued), watch, cancel, download."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from datetime import datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, BackgroundTasks, Header, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import (
    ROW_ID,
    BearerDep,
    SessionDep,
    SettingsDep,
    ShortSessionDep,
    ShortTenantDep,
    StoreDep,
    TenantDep,
    owned,
    unauthorized,
)
from api.routes.datasets import ResolvedDataset, resolve_dataset
from api.routes.teachers import tenant_teacher
from api.schemas import (
    ARTIFACT_RESPONSES,
    NOT_FOUND,
    ArtifactList,
    ArtifactOut,
    DownloadUrl,
    EventPage,
    JobCreate,
    JobOut,
    JobPage,
    JobStatus,
    Message,
    MetricList,
    MetricOut,
    Progress,
)
from api.streams import STREAM_BATCH, EventStreamResponse, event_out, event_stream
from service import jobs as job_state
from service.models import Artifact, Job, JobMetric, Teacher, Tenant
from service.polling import UnknownKey
from service.settings import Settings
from service.storage import ObjectNotFound

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Path(max_length=64)]
ArtifactName = Annotated[str, Path(max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
MAX_BIGINT = 2**63 - 1


def job_out(job: Job | sa.Row[Any]) -> JobOut:
    """A job row (ORM object or a Core row of the ``jobs`` columns) as the API shows it."""
    return JobOut(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        teacher_id=job.teacher_id,
        student=job.student_arch,
        method=job.method,
        dataset=job.dataset_name,
        dataset_id=job.dataset_id,
        params=job.params,
        progress=Progress.model_validate(job.progress or {}),
        latest_metrics=job.latest_metrics,
        error=job.error,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
        warnings=list(job.warnings or []),
        teacher_accuracy=job.teacher_accuracy,
        degenerate_student=bool(job.degenerate_student),
    )


def tenant_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    return owned(session, Job, tenant, job_id, "job")


# ---------------------------------------------------------------- creating a job


def _check_json(value: Any, where: str) -> None:
    """Refuse what JSON columns cannot hold: NaN/inf (Python's json reads them) and NUL characters."""
    if isinstance(value, float) and not math.isfinite(value):
        raise HTTPException(422, detail=f"{where} must be a finite number, got {value}")
    if isinstance(value, str) and "\x00" in value:
        raise HTTPException(422, detail=f"{where} must not contain NUL characters")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, f"{where} key")
            _check_json(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")


def resolve_params(
    body: JobCreate, teacher: Teacher | None, data: ResolvedDataset, settings: Settings
) -> tuple[dict[str, Any], int]:
    """The job as a validated core ``DistillConfig`` dict (ConfigError -> 422 with the known names), and
    the number of epochs it will run.

    ``teacher_path`` and ``data_root`` are left None: the worker fills in its own local paths
    (``service.jobs.run_config``)."""
    from core.errors import ConfigError
    from core.methods import METHODS
    from core.pipeline import DistillConfig

    _check_json(body.method_params, "method_params")
    specs = [s.model_dump(exclude_none=True) for s in body.students] if body.students else None
    for i, spec in enumerate(specs or []):
        _check_json(spec.get("method_params", {}), f"students[{i}].method_params")
    for method_name in [s["method"] for s in specs] if specs else [body.method]:
        if method_name not in METHODS:
            raise ConfigError(f"unknown method {method_name!r}; known: {', '.join(METHODS)}")
    if teacher is not None and teacher.num_classes != data.num_classes:
        raise ConfigError(
            f"teacher {teacher.id} has {teacher.num_classes} classes but dataset {data.name!r} has "
            f"{data.num_classes}; pick a matching teacher or dataset"
        )
    if data.n_train is not None:
        if body.val_size >= data.n_train:
            raise ConfigError(
                f"val_size {body.val_size} leaves no training images: the dataset has {data.n_train}"
            )
        if body.train_subset is not None and body.train_subset > data.n_train - body.val_size:
            raise ConfigError(
                f"train_subset {body.train_subset} is more than the {data.n_train - body.val_size} training "
                "images left after the validation split"
            )
    cfg = DistillConfig(
        teacher_path="teacher" if teacher is not None else None,
        teacher_arch=teacher.arch if teacher is not None else None,
        teacher_format=teacher.format if teacher is not None else "auto",
        teacher_normalize=teacher.normalize_spec if teacher is not None else None,
        student=body.student,
        method=body.method,
        method_params=dict(body.method_params),
        dataset="npz" if data.dataset_id else data.name,
        data_root=str(settings.data_root),
        epochs=body.epochs,
        batch_size=body.batch_size,
        eps=body.eps,
        train_subset=body.train_subset,
        val_size=body.val_size,
        seed=body.seed,
        device=body.device,
        n_eval=body.n_eval,
        students=specs,
        lr=body.lr,
        warmup_epochs=body.warmup_epochs,
        recipe=body.recipe,
        teacher_precision=body.teacher_precision,
        collapse_patience=body.collapse_patience,
        allow_degenerate=body.allow_degenerate,
        teacher_claimed_accuracy=body.teacher_claimed_accuracy,
    )
    if body.attacks is not None:
        cfg.attacks = list(body.attacks)
    if body.exports is not None:
        cfg.exports = list(body.exports)
    epochs = 0
    for sub in cfg.student_configs().values():
        method = sub.build_method(data.num_classes)
        if method.needs_teacher and teacher is None:
            raise ConfigError(
                f"method {sub.method!r} distils from a teacher: give teacher_id "
                "(upload with POST /v1/teachers)"
            )
        epochs = max(epochs, int(method.epochs))
    cfg.validate()
    return {**cfg.to_dict(), "teacher_path": None, "data_root": None}, epochs


def _find_idempotent(session: Session, tenant: Tenant, key: str) -> Job | None:
    return session.scalar(sa.select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == key))


def _replay(
    existing: Job, teacher: Teacher | None, data: ResolvedDataset, params: dict[str, Any], response: Response
) -> JobOut:
    """A repeated Idempotency-Key: the first job (200) when the request resolves to the same job, else 422
    as the IETF Idempotency-Key draft says for a key reused with another payload. The resolved job
    (teacher, dataset, the full config with defaults) is compared, so spelling a default out is the same
    request; nothing is stored to compare with."""
    stored_like = json.loads(json.dumps(params))  # as the JSON column gives it back
    wanted = (teacher.id if teacher else None, data.dataset_id, data.name, stored_like)
    if (existing.teacher_id, existing.dataset_id, existing.dataset_name, existing.params) != wanted:
        raise HTTPException(
            422,
            detail=f"Idempotency-Key {existing.idempotency_key!r} was already used for a different request "
            f"(job {existing.id}); send a new key for a new job",
        )
    response.status_code = 200
    return job_out(existing)


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "This Idempotency-Key already made this job: the first job"},
        **NOT_FOUND,
        422: {
            "model": Message,
            "description": "The request is invalid (`detail` names what to fix), or its Idempotency-Key "
            "was already used for a different request",
        },
        503: {"model": Message},
    },
)
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> JobOut:
    """Queue a distillation job. Repeating a request with the same Idempotency-Key returns the first job
    (200); the same key with a different request is a 422."""
    existing = _find_idempotent(session, tenant, idempotency_key) if idempotency_key else None
    teacher = tenant_teacher(session, tenant, body.teacher_id) if body.teacher_id else None
    data = resolve_dataset(session, settings, tenant, body.dataset)
    params, epochs = resolve_params(body, teacher, data, settings)
    if existing is not None:
        return _replay(existing, teacher, data, params, response)

    job = Job(
        tenant_id=tenant.id,
        teacher_id=teacher.id if teacher else None,
        dataset_name=data.name,
        dataset_id=data.dataset_id,
        student_arch=body.students[0].student if body.students else body.student,
        method=body.students[0].method if body.students else body.method,
        params=params,
        status="queued",
        idempotency_key=idempotency_key,
        progress={"epoch": 0, "epochs": epochs, "fraction": 0.0},
    )
    try:
        session.add(job)
        session.flush()
        job_state.add_event(session, job.id, "status", {"status": "queued"})
        session.commit()
    except IntegrityError:
        session.rollback()
        # Lost a race with the same Idempotency-Key, or the teacher/dataset was deleted meanwhile.
        existing = _find_idempotent(session, tenant, idempotency_key) if idempotency_key else None
        if existing is None:
            raise HTTPException(
                409, detail="the teacher or dataset was deleted while the job was created"
            ) from None
        return _replay(existing, teacher, data, params, response)

    try:
        request.app.state.enqueue(job.id)
    except Exception as exc:
        log.exception("could not enqueue job %s", job.id)
        job_state.transition(session, job, "failed", error=f"could not enqueue: {type(exc).__name__}: {exc}")
        session.commit()
        raise HTTPException(
            503, detail=f"could not enqueue the job ({type(exc).__name__}); it is marked failed"
        ) from exc
    return job_out(job)


# ---------------------------------------------------------------- listing and reading


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        when = datetime.fromisoformat(created)
        if when.tzinfo is None or not isinstance(job_id, str) or not ROW_ID.match(job_id):
            raise ValueError
    except (ValueError, TypeError, binascii.Error):
        raise HTTPException(
            422, detail="invalid cursor: pass next_cursor from a previous page unchanged"
        ) from None
    return when, job_id


@router.get("", response_model=JobPage)
def list_jobs(
    tenant: TenantDep,
    session: SessionDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> JobPage:
    """Newest first; follow next_cursor for older jobs."""
    query = sa.select(Job).where(Job.tenant_id == tenant.id)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor:
        when, job_id = _decode_cursor(cursor)
        query = query.where(sa.or_(Job.created_at < when, sa.and_(Job.created_at == when, Job.id < job_id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return JobPage(items=[job_out(j) for j in rows], next_cursor=_encode_cursor(rows[-1]) if more else None)


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
async def get_job(job_id: JobId, request: Request, credentials: BearerDep) -> Response:
    """The job's status, progress and latest metrics. Clients poll this, so it is one query on the event
    loop (``service.polling``) and its answer is serialized once, without FastAPI's re-validation."""
    try:
        row = await request.app.state.poller.job(credentials.credentials if credentials else None, job_id)
    except UnknownKey:
        raise unauthorized() from None
    if row is None:
        raise HTTPException(404, detail=f"job {job_id[:64]!r} not found")
    return Response(job_out(row).model_dump_json(), media_type="application/json")


@router.get(
    "/{job_id}/events",
    response_model=EventPage,
    responses={
        **NOT_FOUND,
        200: {"content": {"text/event-stream": {}}, "model": EventPage},
        429: {"model": Message, "description": "Too many open event streams for this key or this server"},
    },
)
async def job_events(
    job_id: JobId,
    request: Request,
    credentials: BearerDep,
    after: Annotated[int, Query(ge=0, le=MAX_BIGINT)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    stream: bool = False,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[int | None, Header(ge=0, le=MAX_BIGINT)] = None,
) -> Any:
    """The job's append-only event log after event id ``after``. With ``Accept: text/event-stream`` or
    ``?stream=true``: a live server-sent-event stream that ends when the job has finished (at most
    RD_MAX_STREAMS_PER_KEY open per key, 429 beyond).

    Read on the status poller's async engine, never through an ORM session: a stream lasts as long as
    its job, and a request's session (with its pooled connection) lives until its response is sent."""
    streaming = stream or bool(accept and "text/event-stream" in accept)
    start = last_event_id if streaming and last_event_id is not None else after
    key = credentials.credentials if credentials else None
    poller = request.app.state.poller
    try:
        batch = await poller.events(key, job_id, start, STREAM_BATCH if streaming else limit)
    except UnknownKey:
        raise unauthorized() from None
    if batch is None:
        raise HTTPException(404, detail=f"job {job_id[:64]!r} not found")
    if streaming:
        slot = request.app.state.streams.acquire(batch.key_id)  # 429 beyond the bounds
        content = event_stream(request, request.app.state.job_watch, key, job_id, start, batch)
        return EventStreamResponse(content, slot)
    items = [event_out(row) for row in batch.events]
    return EventPage(items=items, next_after=items[-1].id if items else after)


@router.get("/{job_id}/metrics", response_model=MetricList, responses=NOT_FOUND)
def job_metrics(job_id: JobId, tenant: TenantDep, session: SessionDep) -> MetricList:
    """Per-epoch metrics, oldest first."""
    job = tenant_job(session, tenant, job_id)
    rows = session.scalars(sa.select(JobMetric).where(JobMetric.job_id == job.id).order_by(JobMetric.epoch))
    return MetricList(items=[MetricOut.model_validate(r) for r in rows])


def _artifact(session: Session, job: Job, name: str) -> Artifact:
    row = session.get(Artifact, (job.id, name))
    if row is None:
        raise HTTPException(404, detail=f"job {job.id} has no artifact {name!r} (yet)")
    return row


@router.get("/{job_id}/report", responses=NOT_FOUND)
def job_report(job_id: JobId, tenant: TenantDep, session: SessionDep, store: StoreDep) -> JSONResponse:
    """The robustness report (report.json), once the job wrote it."""
    job = tenant_job(session, tenant, job_id)
    row = session.get(Artifact, (job.id, "report.json"))
    if row is None:
        raise HTTPException(404, detail=f"job {job.id} has no report yet (status: {job.status})")
    try:
        data = b"".join(store.iter_bytes(row.object_key))
    except ObjectNotFound:
        raise HTTPException(404, detail=f"the report of job {job.id} is missing from the store") from None
    return JSONResponse(json.loads(data))


@router.post("/{job_id}/cancel", response_model=JobOut, responses={**NOT_FOUND, 409: {"model": Message}})
def cancel_job(
    job_id: JobId, request: Request, background: BackgroundTasks, tenant: TenantDep, session: SessionDep
) -> JobOut:
    """Cancel: a queued job stops at once, a running one at its worker's next check."""
    job = tenant_job(session, tenant, job_id)
    try:
        job_state.request_cancel(session, job)
    except job_state.IllegalTransition:
        session.rollback()
        raise HTTPException(409, detail=f"job {job.id} already finished ({job.status})") from None
    session.commit()
    background.add_task(_revoke, request.app.state.revoke, job.id)
    return job_out(job)


def _revoke(revoke: Any, job_id: str) -> None:
    try:
        revoke(job_id)
    except Exception:  # best effort: the worker also checks the flag
        log.warning("could not revoke the task of job %s", job_id, exc_info=True)


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=NOT_FOUND)
def list_artifacts(job_id: JobId, tenant: TenantDep, session: SessionDep) -> ArtifactList:
    job = tenant_job(session, tenant, job_id)
    rows = session.scalars(sa.select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name))
    return ArtifactList(items=[ArtifactOut.model_validate(r) for r in rows])


@router.get(
    "/{job_id}/artifacts/{name}",
    responses={**NOT_FOUND, **ARTIFACT_RESPONSES},
)
def get_artifact(
    job_id: JobId,
    name: ArtifactName,
    request: Request,
    tenant: ShortTenantDep,
    session: ShortSessionDep,
    store: StoreDep,
    settings: SettingsDep,
    redirect: bool = False,
    presign: bool = False,
) -> Response:
    """Download a job's file (streamed), or get a short-lived presigned URL for it. The database session
    is released before the bytes flow (``ShortSessionDep``)."""
    job = tenant_job(session, tenant, job_id)
    row = _artifact(session, job, name)
    if presign or redirect:
        url = store.presigned_url(row.object_key, settings.presign_seconds)
        if url and redirect:
            return RedirectResponse(url, status_code=307)
        if presign:
            if url:
                return JSONResponse(DownloadUrl(url=url, expires_in=settings.presign_seconds).model_dump())
            # A local folder cannot sign URLs: the API itself is the download URL (bearer key needed).
            own = str(request.url_for("get_artifact", job_id=job.id, name=row.name))
            return JSONResponse(DownloadUrl(url=own, expires_in=None).model_dump())
    try:
        chunks = store.iter_bytes(row.object_key)
    except ObjectNotFound:
        raise HTTPException(
            404, detail=f"artifact {name!r} of job {job.id} is missing from the store"
        ) from None
    media = "application/json" if name.endswith(".json") else "application/octet-stream"
    return StreamingResponse(
        chunks,
        media_type=media,
        headers={
            "Content-Disposition": f'attachment; filename="{row.name}"',
            "Content-Length": str(row.size_bytes),
        },
    )
