"""Service settings from the environment (prefix ``RD_``).

Every default is the embedded setup: SQLite, a folder broker and a folder object store under
``RD_VAR_DIR``, so one process on a laptop needs no servers. Production points the URLs elsewhere.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RD_", extra="ignore")

    var_dir: Path = Path("./var")
    # Empty means "derive from var_dir" (filled in by _fill_defaults).
    database_url: str = ""
    broker_url: str = ""
    store_url: str = ""
    s3_endpoint_url: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str | None = None
    data_root: Path | None = None
    work_dir: Path | None = None
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    # What an upload may expand to (zip members' declared sizes, .npy shapes): ratio x max_upload_bytes
    # in all, and at most max_array_elements per array (core.archive_limits).
    max_expansion_ratio: int = Field(default=4, ge=1, le=1000)
    max_array_elements: int = Field(default=2**29, ge=1)
    # Each uploaded file is checked in its own child process (api.check_process), killed past these.
    check_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    check_memory_mb: int = Field(default=3072, ge=256)
    check_concurrency: int = Field(default=2, ge=1, le=64)
    queue: str = "distill"
    presign_seconds: int = Field(default=300, gt=0)
    # Database connections per API process. The API runs its sync steps in as many threads as this pool
    # holds connections (pool + overflow), so a thread never waits for a connection.
    db_pool_size: int = Field(default=20, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)
    # Connections of the async engine that answers status polls on the event loop (service.polling).
    # A poll holds one for a single query, so a few serve hundreds of polls a second.
    db_poll_pool_size: int = Field(default=5, ge=1)
    # Open server-sent event streams (GET /v1/jobs/{id}/events with Accept: text/event-stream) per API
    # key and in all, counted per API process: with N processes the bounds are N times these.
    max_streams_per_key: int = Field(default=8, ge=1, le=100_000)
    max_streams: int = Field(default=500, ge=1, le=100_000)
    # Prometheus metrics (api/metrics.py, worker/metrics.py). ``metrics`` (on|off) turns the API's
    # GET /metrics on or off; with ``metrics_port`` set it is served by a small server of its own on
    # ``metrics_host``:``metrics_port`` instead of by the app. The job metrics are read from the
    # database and the broker at scrape time, each bounded by ``metrics_timeout_s``. A worker serves its
    # metrics on ``worker_metrics_port`` when set (off by default).
    metrics: bool = True
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "0.0.0.0"
    metrics_timeout_s: float = Field(default=2.0, gt=0, le=60)
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        var = self.var_dir.expanduser().resolve()
        self.var_dir = var
        if not self.database_url:
            self.database_url = f"sqlite:///{var / 'rd.sqlite3'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if not self.store_url:
            self.store_url = f"file://{var / 'objects'}"
        if self.data_root is None:
            shared = REPO_ROOT.parent / "shared" / "data"
            self.data_root = shared if shared.is_dir() else var / "data"
        if self.work_dir is None:
            self.work_dir = var / "work"
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def broker_dir(self) -> Path:
        """Where the folder broker (``filesystem://``) keeps its messages."""
        return self.var_dir / "broker"

    @property
    def upload_dir(self) -> Path:
        """Scratch space for uploads being received and checked."""
        assert self.work_dir is not None
        return self.work_dir / "uploads"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
