"""The object store: a local folder (embedded) or any S3 server, behind one small interface.

Keys follow docs/service-design.md; the helpers below build them so no caller formats keys by hand.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol
from urllib.parse import urlparse

if TYPE_CHECKING:
    from service.settings import Settings

CHUNK = 1 << 20
_KEY_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class ObjectNotFound(LookupError):
    """The key names no object."""


class StoreError(RuntimeError):
    """The store could not be reached or refused the operation."""


def validate_key(key: str) -> str:
    """Reject keys that could escape the store's root (``..``, absolute paths, odd characters)."""
    if not key or len(key) > 512:
        raise ValueError(f"bad object key {key!r}: empty or longer than 512 characters")
    parts = key.split("/")
    for part in parts:
        if part in (".", "..") or not _KEY_PART.match(part):
            raise ValueError(f"bad object key {key!r}: each part must match {_KEY_PART.pattern}")
    return key


def safe_filename(name: str | None, default: str) -> str:
    """A user's file name reduced to characters that are valid in a key part."""
    base = _UNSAFE_NAME_CHARS.sub("_", Path(name or "").name).strip("._-")[:100]
    return base or default


def teacher_key(tenant_id: str, teacher_id: str, filename: str) -> str:
    return validate_key(f"tenants/{tenant_id}/teachers/{teacher_id}/{filename}")


def dataset_key(tenant_id: str, dataset_id: str) -> str:
    return validate_key(f"tenants/{tenant_id}/datasets/{dataset_id}.npz")


def job_key(tenant_id: str, job_id: str, name: str) -> str:
    """Key of a job's file: ``checkpoint.pt``, ``student_best.pt``, ``student_last.pt``, ``report.json``."""
    return validate_key(f"tenants/{tenant_id}/jobs/{job_id}/{name}")


class ObjectStore(Protocol):
    def put_stream(self, key: str, stream: BinaryIO) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def iter_bytes(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def presigned_url(self, key: str, expires_s: int) -> str | None: ...
    def ping(self) -> None: ...
    def list_keys(self, prefix: str = "") -> list[str]: ...
    def abort_incomplete(self, older_than_s: float) -> int: ...


def _atomic_copy(stream: BinaryIO, dest: Path) -> None:
    """Write a stream to ``dest`` through a temporary sibling, so readers never see half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(stream, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStore:
    """Objects as files under one folder (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"bad object key {key!r}: outside the store")
        return path

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        _atomic_copy(stream, self._path(key))

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as f:
            _atomic_copy(f, self._path(key))

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        try:
            f = open(src, "rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        with f:
            _atomic_copy(f, Path(path))

    def iter_bytes(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        return _iter_file(f, chunk)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop folders left empty so a deleted tenant or job leaves nothing behind.
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return None

    def ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"object folder {self.root} is not writable")

    def list_keys(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not Path(k).name.startswith(".tmp-"))

    def abort_incomplete(self, older_than_s: float) -> int:
        """Delete the half-written ``.tmp-*`` files of writers that died (older than ``older_than_s``)."""
        if not self.root.is_dir():
            return 0
        cutoff, removed = time.time() - older_than_s, 0
        for path in self.root.rglob(".tmp-*"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # finished or removed meanwhile
                continue
        return removed


def _iter_file(f: BinaryIO, chunk: int) -> Iterator[bytes]:
    with f:
        while data := f.read(chunk):
            yield data


class S3Store:
    """Objects in an S3 bucket (any S3-compatible server: AWS, SeaweedFS, MinIO)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(
            # Path-style addressing works with every S3 server, virtual-host style needs DNS.
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            signature_version="s3v4",
        )
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region or "us-east-1",
            config=config,
        )

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _not_found(self, exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        # upload_fileobj switches to a multipart upload for large streams.
        self.client.upload_fileobj(stream, self.bucket, self._key(key))

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def get_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self._key(key), tmp)
            os.replace(tmp, path)
        except ClientError as exc:
            Path(tmp).unlink(missing_ok=True)
            if self._not_found(exc):
                raise ObjectNotFound(key) from exc
            raise
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def iter_bytes(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if self._not_found(exc):
                raise ObjectNotFound(key) from exc
            raise
        return _iter_body(body, chunk)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if self._not_found(exc):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
        )

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def list_keys(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base + prefix
        )
        for page in pages:
            keys.extend(item["Key"][len(base) :] for item in page.get("Contents", []))
        return sorted(keys)

    def abort_incomplete(self, older_than_s: float) -> int:
        """Abort the multipart uploads under this store's prefix begun over ``older_than_s`` ago: the parts
        a writer uploaded before it died (an API killed during a large put) take space until aborted.
        Younger uploads may still be in progress in another process and are left alone."""
        from botocore.exceptions import ClientError

        base = f"{self.prefix}/" if self.prefix else ""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than_s)
        stale: list[tuple[str, str]] = []
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=base)
        for page in pages:
            for upload in page.get("Uploads", []):
                initiated = upload.get("Initiated")
                if initiated is not None and initiated.tzinfo is None:
                    initiated = initiated.replace(tzinfo=timezone.utc)
                if initiated is not None and initiated < cutoff:
                    stale.append((upload["Key"], upload["UploadId"]))
        aborted = 0
        for key, upload_id in stale:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                aborted += 1
            except ClientError as exc:  # completed or aborted meanwhile (another API process)
                if str(exc.response.get("Error", {}).get("Code", "")) != "NoSuchUpload":
                    raise
        return aborted


def _iter_body(body: Any, chunk: int) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(chunk)
    finally:
        body.close()


def open_store(settings: Settings) -> ObjectStore:
    """The store named by ``RD_STORE_URL``: ``file:///path`` or ``s3://bucket[/prefix]``."""
    url = urlparse(settings.store_url)
    if url.scheme == "file":
        return LocalStore(Path(url.netloc + url.path) if url.netloc else Path(url.path))
    if url.scheme == "s3":
        if not url.netloc:
            raise ValueError(f"RD_STORE_URL {settings.store_url!r} names no bucket (s3://bucket[/prefix])")
        return S3Store(
            url.netloc,
            url.path,
            endpoint_url=settings.s3_endpoint_url,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            region=settings.s3_region,
        )
    raise ValueError(f"RD_STORE_URL {settings.store_url!r}: use file:///path or s3://bucket")
