"""Request and response bodies of the API, all in one place so the OpenAPI document reads as one story.

The bodies a client sends and receives are defined in ``distill_client.models`` (pydantic only, so the
client package installs without the server) and re-exported here; what only the server needs (response
declarations, health bodies) is defined here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

# The bodies a client sees are defined once, in the client package, and re-exported here: the OpenAPI
# document is generated from the very classes the client parses answers with.
from distill_client.models import (
    ArtifactList,
    ArtifactOut,
    BuiltinDataset,
    DatasetList,
    DatasetOut,
    DownloadUrl,
    ErrorItem,
    ErrorOut,
    EventOut,
    EventPage,
    JobCreate,
    JobOut,
    JobPage,
    JobStatus,
    MetricList,
    MetricOut,
    ModelFormat,
    Normalization,
    Progress,
    StudentSpec,
    TeacherList,
    TeacherOut,
)

__all__ = [
    "ARTIFACT_RESPONSES",
    "NOT_FOUND",
    "ArtifactList",
    "ArtifactOut",
    "BuiltinDataset",
    "DatasetList",
    "DatasetOut",
    "DownloadUrl",
    "ErrorItem",
    "ErrorOut",
    "EventOut",
    "EventPage",
    "Health",
    "JobCreate",
    "JobOut",
    "JobPage",
    "JobStatus",
    "Message",
    "MetricList",
    "MetricOut",
    "ModelFormat",
    "Normalization",
    "Progress",
    "Readiness",
    "StudentSpec",
    "TeacherList",
    "TeacherOut",
]

Message = ErrorOut  # the name the routes used before the shape had a list of errors

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut}}


# GET /v1/jobs/{job_id}/artifacts/{name}: what comes back depends on the query, which OpenAPI cannot tie
# to a content type, so the document says each case in words and gives every body its schema.
ARTIFACT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file itself: a `.json` artifact (report.json, NAME.report.json) as "
        "application/json, any other as application/octet-stream. With `?presign=true`: a DownloadUrl "
        "(application/json) instead.",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {
                    "anyOf": [
                        DownloadUrl.model_json_schema(),
                        {"type": "object", "description": "The content of a .json artifact"},
                    ]
                }
            },
        },
    },
    307: {"description": "With `?redirect=true` on an S3 store: a presigned URL in Location"},
}


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]
