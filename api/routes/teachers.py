"""Teachers: robust models uploaded by a tenant, checked by loading and probing them before they are kept."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, File, Form, HTTPException, Response, UploadFile
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep, owned, plain_text
from api.model_check import AccuracyCheck, CheckedModel, CheckerDep, check_model_isolated
from api.routes.datasets import resolve_dataset
from api.schemas import NOT_FOUND, Message, ModelFormat, TeacherList, TeacherOut
from api.uploads import ReceivedFile, forget_object, received_upload
from service import jobs as job_state
from service.models import Job, Teacher, Tenant, new_id
from service.storage import ObjectStore, safe_filename, teacher_key

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/teachers", tags=["teachers"])


def _store_teacher(
    session: Session,
    store: ObjectStore,
    tenant: Tenant,
    received: ReceivedFile,
    checked: CheckedModel,
    name: str | None,
    filename: str,
) -> Teacher:
    """Object first, then the row; a failed insert takes the object back out."""
    teacher_id = new_id()
    key = teacher_key(tenant.id, teacher_id, filename)
    try:
        store.put_file(key, received.path)
    except Exception as exc:
        log.exception("storing teacher %s failed", key)
        forget_object(store, key)
        raise HTTPException(503, detail=f"could not store the file: {type(exc).__name__}") from exc
    try:
        row = Teacher(
            id=teacher_id,
            tenant_id=tenant.id,
            name=name or Path(filename).stem,
            format=checked.format,
            arch=checked.arch,
            num_classes=checked.num_classes,
            normalize=checked.normalize,
            sha256=received.sha256,
            size_bytes=received.size,
            num_params=checked.num_params,
            probe=checked.probe,
            object_key=key,
        )
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        forget_object(store, key)
        raise
    return row


def tenant_teacher(session: Session, tenant: Tenant, teacher_id: str) -> Teacher:
    return owned(session, Teacher, tenant, teacher_id, "teacher")


@router.post(
    "",
    status_code=201,
    response_model=TeacherOut,
    responses={
        404: {"model": Message, "description": "`dataset` names an upload this key does not have"},
        413: {"model": Message},
        422: {"model": Message},
    },
)
async def upload_teacher(
    tenant: TenantDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    checker: CheckerDep,
    file: Annotated[
        UploadFile, File(description="TorchScript, torch.export (.pt2), state_dict or safetensors")
    ],
    format: Annotated[ModelFormat, Form()] = "auto",
    arch: Annotated[
        str | None, Form(max_length=64, description="Architecture name; required for state_dict/safetensors")
    ] = None,
    normalize: Annotated[
        str | None,
        Form(
            max_length=500,
            description="Input normalisation the model expects: 'm1,m2,m3;s1,s2,s3' or 'cifar10'",
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        Form(max_length=64, description="Builtin dataset name or uploaded dataset id; sets the classes"),
    ] = None,
    num_classes: Annotated[int | None, Form(ge=2, le=100_000)] = None,
    name: Annotated[str | None, Form(max_length=255)] = None,
    claimed_accuracy: Annotated[
        float | None,
        Form(gt=0, le=1, description="The teacher's clean accuracy as its uploader knows it (0-1)"),
    ] = None,
) -> Teacher:
    """Upload a teacher. It is loaded and run once on random images; only a file that passes is kept.

    With a builtin ``dataset`` its clean accuracy on that dataset's validation split is measured too
    (``probe.accuracy_check``, with warnings when it is at chance, looks misread or falls well below
    ``claimed_accuracy``); a job's own teacher check before training is what fails a job."""
    arch, normalize = plain_text(arch, "arch"), plain_text(normalize, "normalize")
    dataset, name = plain_text(dataset, "dataset"), plain_text(name, "name")
    accuracy_on: AccuracyCheck | None = None
    if dataset is not None:
        resolved = await run_in_threadpool(resolve_dataset, session, settings, tenant, dataset)
        if num_classes is not None and num_classes != resolved.num_classes:
            raise HTTPException(
                422,
                detail=f"num_classes {num_classes} contradicts dataset {dataset!r} ({resolved.num_classes})",
            )
        num_classes = resolved.num_classes
        if resolved.dataset_id is None:
            accuracy_on = AccuracyCheck(resolved.name, str(settings.data_root), claimed_accuracy)
    filename = safe_filename(file.filename, "teacher.bin")
    async with received_upload(file, settings.upload_dir, settings.max_upload_bytes, filename) as received:
        checked = await check_model_isolated(
            checker, settings, received.path, arch, num_classes, normalize, format, accuracy_on
        )
        return await run_in_threadpool(
            _store_teacher, session, store, tenant, received, checked, name, filename
        )


@router.get("", response_model=TeacherList)
def list_teachers(tenant: TenantDep, session: SessionDep) -> TeacherList:
    rows = session.scalars(
        sa.select(Teacher).where(Teacher.tenant_id == tenant.id).order_by(Teacher.created_at.desc())
    )
    return TeacherList(items=[TeacherOut.model_validate(r) for r in rows])


@router.get("/{teacher_id}", response_model=TeacherOut, responses=NOT_FOUND)
def get_teacher(teacher_id: str, tenant: TenantDep, session: SessionDep) -> Teacher:
    return tenant_teacher(session, tenant, teacher_id)


@router.delete("/{teacher_id}", status_code=204, responses={**NOT_FOUND, 409: {"model": Message}})
def delete_teacher(teacher_id: str, tenant: TenantDep, session: SessionDep, store: StoreDep) -> Response:
    row = tenant_teacher(session, tenant, teacher_id)
    row_id, key = row.id, row.object_key
    if busy := job_state.release_for_delete(session, Job.teacher_id, row_id):
        raise HTTPException(409, detail=f"teacher {row_id} is used by unfinished job {busy}")
    session.delete(row)
    try:
        session.commit()
    except IntegrityError:  # a job naming it was created meanwhile (see service.jobs.release_for_delete)
        session.rollback()
        raise HTTPException(409, detail=f"teacher {row_id} is used by a job created meanwhile") from None
    forget_object(store, key)
    return Response(status_code=204)
