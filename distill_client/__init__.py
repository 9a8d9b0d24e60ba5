"""A light client for the robust distillation service: httpx and pydantic only (no torch, no server).

Install alone with ``pip install ./clients/python`` (the server's own install includes it). ``Client``
(and ``AsyncClient``) return the API's pydantic models (``distill_client.models``, the very classes the
server's OpenAPI document is built from) and raise ``ApiError`` subclasses carrying the server's message.
"""

from distill_client.aio import AsyncClient
from distill_client.client import Client
from distill_client.errors import (
    ApiError,
    ChecksumMismatch,
    Conflict,
    DistillError,
    JobTimeout,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    ValidationError,
)
from distill_client.models import (
    ArtifactOut,
    DatasetOut,
    EventOut,
    JobCreate,
    JobOut,
    MetricOut,
    Progress,
    Report,
    StudentSpec,
    TeacherOut,
)
from distill_client.transport import RetryPolicy

__version__ = "0.1.0"
__all__ = [
    "ApiError",
    "ArtifactOut",
    "AsyncClient",
    "ChecksumMismatch",
    "Client",
    "Conflict",
    "DatasetOut",
    "DistillError",
    "EventOut",
    "JobCreate",
    "JobOut",
    "JobTimeout",
    "MetricOut",
    "NotFound",
    "PayloadTooLarge",
    "Progress",
    "RateLimited",
    "Report",
    "RetryPolicy",
    "ServiceUnavailable",
    "StudentSpec",
    "TeacherOut",
    "Unauthorized",
    "ValidationError",
]
