"""Datasets: the builtin CIFAR sets found under RD_DATA_ROOT, and each tenant's own .npz uploads."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, File, Form, HTTPException, Response, UploadFile
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import ROW_ID, SessionDep, SettingsDep, StoreDep, TenantDep, owned, plain_text
from api.model_check import CheckerDep, check_dataset_isolated
from api.schemas import NOT_FOUND, BuiltinDataset, DatasetList, DatasetOut, Message
from api.uploads import ReceivedFile, forget_object, received_upload
from service import jobs as job_state
from service.models import Dataset, Job, Tenant, new_id
from service.settings import Settings
from service.storage import ObjectStore, dataset_key, safe_filename

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

# name -> (folder under the data root, classes, note)
BUILTIN: dict[str, tuple[str, int, str]] = {
    "cifar10": ("cifar-10-batches-py", 10, "CIFAR-10, official python files"),
    "cifar100": ("cifar-100-python", 100, "CIFAR-100, official python files"),
    "cifar10-partial": ("cifar-10-batches-py-partial", 10, "the recovered part of CIFAR-10"),
    "cifar100-partial": ("cifar-100-python-partial", 100, "the recovered part of CIFAR-100"),
}


def builtin_available(settings: Settings, name: str) -> bool:
    assert settings.data_root is not None
    folder = settings.data_root / BUILTIN[name][0]
    return folder.is_dir() and any(folder.iterdir())


@dataclass
class ResolvedDataset:
    """What a job or a teacher upload needs to know about a dataset reference."""

    name: str
    num_classes: int
    dataset_id: str | None = None
    n_train: int | None = None


def resolve_dataset(session: Session, settings: Settings, tenant: Tenant, ref: str) -> ResolvedDataset:
    """A builtin name or the id of one of the tenant's uploads; 422/404 with what would be accepted."""
    key = ref.strip().lower().replace("_", "-")
    if key in BUILTIN:
        if not builtin_available(settings, key):
            raise HTTPException(
                422,
                detail=f"dataset {key!r} is not available on this server (its files are not installed)",
            )
        return ResolvedDataset(name=key, num_classes=BUILTIN[key][1])
    if ROW_ID.match(ref):
        row = tenant_dataset(session, tenant, ref)
        return ResolvedDataset(
            name=row.name, num_classes=row.num_classes, dataset_id=row.id, n_train=row.n_train
        )
    raise HTTPException(
        422,
        detail=f"unknown dataset {ref!r}; use a builtin ({', '.join(BUILTIN)}) or an uploaded dataset's id",
    )


def tenant_dataset(session: Session, tenant: Tenant, dataset_id: str) -> Dataset:
    return owned(session, Dataset, tenant, dataset_id, "dataset")


def _store_dataset(
    session: Session,
    store: ObjectStore,
    tenant: Tenant,
    received: ReceivedFile,
    info: dict[str, Any],
    name: str | None,
) -> Dataset:
    dataset_id = new_id()
    key = dataset_key(tenant.id, dataset_id)
    try:
        store.put_file(key, received.path)
    except Exception as exc:
        log.exception("storing dataset %s failed", key)
        forget_object(store, key)
        raise HTTPException(503, detail=f"could not store the file: {type(exc).__name__}") from exc
    try:
        row = Dataset(
            id=dataset_id,
            tenant_id=tenant.id,
            name=name or Path(received.filename or "dataset.npz").stem,
            sha256=received.sha256,
            size_bytes=received.size,
            object_key=key,
            **info,
        )
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        forget_object(store, key)
        raise
    return row


@router.get("", response_model=DatasetList)
def list_datasets(tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> DatasetList:
    builtin = [
        BuiltinDataset(name=name, num_classes=classes, available=builtin_available(settings, name), note=note)
        for name, (_, classes, note) in BUILTIN.items()
    ]
    rows = session.scalars(
        sa.select(Dataset).where(Dataset.tenant_id == tenant.id).order_by(Dataset.created_at.desc())
    )
    return DatasetList(builtin=builtin, uploaded=[DatasetOut.model_validate(r) for r in rows])


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses={413: {"model": Message}, 422: {"model": Message}},
)
async def upload_dataset(
    tenant: TenantDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    checker: CheckerDep,
    file: Annotated[
        UploadFile, File(description="An .npz with x (images), y (labels), optional x_test/y_test")
    ],
    name: Annotated[str | None, Form(max_length=255)] = None,
) -> Dataset:
    """Upload an .npz dataset; it is checked completely, in a checking process, before it is kept."""
    name = plain_text(name, "name")
    filename = safe_filename(file.filename, "dataset.npz")
    async with received_upload(file, settings.upload_dir, settings.max_upload_bytes, filename) as received:
        checked = await check_dataset_isolated(checker, settings, received.path, filename)
        info = asdict(checked)
        return await run_in_threadpool(_store_dataset, session, store, tenant, received, info, name)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=NOT_FOUND)
def get_dataset(dataset_id: str, tenant: TenantDep, session: SessionDep) -> Dataset:
    return tenant_dataset(session, tenant, dataset_id)


@router.delete("/{dataset_id}", status_code=204, responses={**NOT_FOUND, 409: {"model": Message}})
def delete_dataset(dataset_id: str, tenant: TenantDep, session: SessionDep, store: StoreDep) -> Response:
    row = tenant_dataset(session, tenant, dataset_id)
    row_id, key = row.id, row.object_key
    if busy := job_state.release_for_delete(session, Job.dataset_id, row_id):
        raise HTTPException(409, detail=f"dataset {row_id} is used by unfinished job {busy}")
    session.delete(row)
    try:
        session.commit()
    except IntegrityError:  # a job naming it was created meanwhile (see service.jobs.release_for_delete)
        session.rollback()
        raise HTTPException(409, detail=f"dataset {row_id} is used by a job created meanwhile") from None
    forget_object(store, key)
    return Response(status_code=204)
