"""Request dependencies: settings, a database session, the object store and the caller's tenant."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.auth import tenant_for_key
from service.models import ROW_ID, Tenant
from service.settings import Settings
from service.storage import ObjectStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session per request, admitted by ``app.state.db_gate``: no more sessions than pooled connections.

    A request keeps its connection between its sync steps (auth, handler, response validation), each of
    which waits for a thread of its own. Unbounded, 200 concurrent requests deadlock: every thread waits
    for a connection held by a request that waits for a thread. With at most as many sessions as
    connections (and as many threads), every admitted request finishes; the rest wait on the event loop.
    Opening and closing happen on the event loop, so releasing a connection never waits for a thread.
    """
    gate = getattr(request.app.state, "db_gate", None)  # set by the lifespan (absent without one)
    async with gate or contextlib.nullcontext():
        session = request.app.state.session_factory()
        try:
            yield session
        finally:
            session.close()


def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


def get_enqueue(request: Request) -> Callable[[str], None]:
    return request.app.state.enqueue


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer rd_...`")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def unauthorized() -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid API key: send 'Authorization: Bearer rd_...'",
        headers={"WWW-Authenticate": "Bearer"},
    )


def get_tenant(session: SessionDep, credentials: BearerDep) -> Tenant:
    """The tenant owning the bearer key; 401 for a missing, unknown or revoked key."""
    tenant = tenant_for_key(session, credentials.credentials) if credentials else None
    if tenant is None:
        raise unauthorized()
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]

# For routes that stream their response (downloads): a yield dependency normally lives until the last
# byte is sent, so every slow download would hold a pooled connection and a place at the gate, and a few
# dozen of them would stall every other request. With scope="function" the session closes (and the gate
# admits the next request) as soon as the route function has returned its response.
ShortSessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_tenant_short(session: ShortSessionDep, credentials: BearerDep) -> Tenant:
    """``get_tenant`` on a session that closes when the route returns."""
    return get_tenant(session, credentials)


ShortTenantDep = Annotated[Tenant, Depends(get_tenant_short, scope="function")]

Row = TypeVar("Row")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def owned(session: Session, model: type[Row], tenant: Tenant, row_id: str, what: str) -> Row:
    """The tenant's row with this id; 404 alike for a missing row, another tenant's row or a malformed id
    (which never reaches the database)."""
    row: Any = session.get(model, row_id) if ROW_ID.match(row_id) else None
    if row is None or row.tenant_id != tenant.id:
        raise HTTPException(404, detail=f"{what} {row_id[:64]!r} not found")
    return row


def plain_text(value: str | None, field: str) -> str | None:
    """A form field stripped, '' as None, control characters (NUL breaks PostgreSQL text) refused."""
    if value is None or not value.strip():
        return None
    if _CONTROL.search(value):
        raise HTTPException(422, detail=f"{field} must not contain control characters")
    return value.strip()
