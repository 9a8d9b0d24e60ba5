"""Receiving uploaded files: bounded in size, streamed to a temporary file while hashed, always cleaned up.

Two guards enforce ``RD_MAX_UPLOAD_BYTES``. ``BodySizeLimit`` (ASGI middleware) refuses a request whose
Content-Length is too large before any of it is read, and stops one without a length as soon as its
bytes pass the limit. ``received_upload`` then applies the exact limit to the file itself.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fastapi import HTTPException, UploadFile
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.metrics import note_upload
from service.storage import ObjectStore

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# Room for the multipart framing and the small form fields around the file.
FORM_OVERHEAD = 1 << 20


def too_large(limit: int) -> HTTPException:
    return HTTPException(
        413,
        detail=f"upload too large: the limit is {limit} bytes (RD_MAX_UPLOAD_BYTES)",
    )


class BodySizeLimit:
    """Reject request bodies larger than ``max_upload_bytes`` plus form overhead, reading as little as
    possible of them."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_body = max_upload_bytes + FORM_OVERHEAD

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = too_large(self.max_upload_bytes)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await JSONResponse({"detail": error.detail}, status_code=error.status_code)(scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise error
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except HTTPException as exc:
            # Raised where the framework could not turn it into a response itself.
            if exc is not error or started:
                raise
            await JSONResponse({"detail": error.detail}, status_code=error.status_code)(scope, receive, send)


@dataclass
class ReceivedFile:
    path: Path
    sha256: str
    size: int
    filename: str | None


def _copy_limited(src: BinaryIO, dest: Path, limit: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), size


@asynccontextmanager
async def received_upload(
    upload: UploadFile, folder: Path, limit: int, filename: str
) -> AsyncIterator[ReceivedFile]:
    """Copy the upload in 1 MiB chunks into a private temporary folder (sha256 and size counted on the
    way), as ``filename`` so that messages about the file name the user's file; the folder is deleted
    when the block exits, whatever happens inside it."""
    folder.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(dir=folder, prefix="upload-"))
    path = private / filename
    try:
        digest, size = await run_in_threadpool(_copy_limited, upload.file, path, limit)
        if size == 0:
            raise HTTPException(422, detail="the uploaded file is empty")
        note_upload(size)  # rd_upload_bytes_total (api/metrics.py)
        yield ReceivedFile(path=path, sha256=digest, size=size, filename=upload.filename)
    finally:
        await upload.close()
        await run_in_threadpool(shutil.rmtree, private, True)


def forget_object(store: ObjectStore, key: str) -> None:
    """Best-effort delete of an object whose row was never written (or was just deleted)."""
    try:
        store.delete(key)
    except Exception:
        log.exception("could not delete object %s; it is orphaned", key)
