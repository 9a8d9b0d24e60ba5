"""One error shape for the whole API, and an OpenAPI document that says so.

Every error answer is ``ErrorOut`` (``{"detail": str, "errors"?: [{loc, msg, type}]}``), whoever raised it:
request validation, an ``HTTPException`` of a route, the framework's own 400/404/405, a ``UserError`` of
the core library. The document is post-processed in one place (``openapi_document``) so that every
operation, including ones added later, declares the answers it can really give:

- 401 on every operation with a security requirement (a missing, unknown or revoked key);
- 404 on every operation with a path parameter (no such row for this key);
- 413 and 422 on every operation with a request body (``BodySizeLimit``; a body that does not validate);
- 422 on every operation with parameters;
- FastAPI's default ``HTTPValidationError`` (where ``detail`` is a list) replaced by ``ErrorOut``, and
  every declared 4xx/5xx without a body given the ``ErrorOut`` body;
- an optional query/header/path parameter is written without ``null`` (``anyOf: [T, null]`` -> ``T``):
  HTTP has no null there, the parameter is simply left out.

Decisions: a body that cannot be parsed at all (JSON that is not UTF-8, broken multipart framing) is a
422 like a JSON syntax error, not the framework's 400; a 405 carries an ``Allow`` header listing every
method of every route on that path (the framework lists only the first route's).
"""

from __future__ import annotations

import copy
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.schemas import ErrorOut

OPERATION_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
SCHEMA_REF = "#/components/schemas/{model}"
ERROR_REF = {"$ref": SCHEMA_REF.format(model="ErrorOut")}
DESCRIPTIONS: dict[str, str] = {
    "400": "Bad request",
    "401": "Missing, unknown or revoked API key: send `Authorization: Bearer rd_...`",
    "403": "Forbidden",
    "404": "No such resource for this key (another tenant's id is a 404 too)",
    "405": "Method not allowed (the Allow header lists the path's methods)",
    "409": "Conflict with the resource's current state",
    "413": "The request body is larger than RD_MAX_UPLOAD_BYTES allows",
    "422": "The request is invalid: `detail` names what to fix, `errors` lists bad fields",
    "429": "Too many requests of this kind for this key or this server",
    "500": "Internal error",
    "503": "A backing service (database, broker, object store) is unavailable",
}


def error_body(detail: str, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"detail": detail}
    if errors:
        body["errors"] = errors
    return body


# ---------------------------------------------------------------- exception handlers


def allowed_methods(app: FastAPI, path: str) -> list[str] | None:
    """The methods the document gives this path (HEAD with GET), so that a 405's ``Allow`` and the document
    agree by construction; None for a path the document does not list."""
    paths: dict[str, Any] = app.openapi()["paths"]
    for template in sorted(paths, key=lambda t: t.count("{")):  # /v1/jobs/x before /v1/jobs/{job_id}
        pattern = "/".join("[^/]+" if p.startswith("{") else re.escape(p) for p in template.split("/"))
        if re.fullmatch(pattern, path):
            methods = {m.upper() for m in paths[template] if m in OPERATION_METHODS}
            return sorted(methods | ({"HEAD"} if "GET" in methods else set()))
    return None


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every ``HTTPException`` (ours and the framework's) in the one shape.

    The routes never raise 400: a 400 here is the framework failing to parse the body before validation
    (JSON that is not UTF-8, broken multipart framing), which this API answers as 422 like any other
    body that does not validate."""
    headers = dict(exc.headers or {})
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 400:
        msg = f"the request body could not be parsed: {detail}"
        return JSONResponse(
            error_body(msg, [{"loc": ["body"], "msg": msg, "type": "body_unparsable"}]), status_code=422
        )
    if exc.status_code == 405:
        root = request.scope.get("root_path", "")
        path = request.url.path.removeprefix(root) if root else request.url.path
        methods = allowed_methods(request.app, path)
        if methods is not None:
            headers["Allow"] = ", ".join(methods)
        detail = f"method {request.method} is not allowed here; allowed: {headers.get('Allow', 'none')}"
    return JSONResponse(error_body(detail), status_code=exc.status_code, headers=headers or None)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug is still answered in the one shape, naming nothing of the server (the traceback goes to the
    log: the framework re-raises after this response)."""
    return JSONResponse(error_body("internal error; it was logged"), status_code=500)


# ---------------------------------------------------------------- the OpenAPI document


def _strip_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``anyOf: [T, {type: null}]`` -> ``T`` (keeping title/description), for parameters only."""
    options = schema.get("anyOf")
    if not isinstance(options, list) or {"type": "null"} not in options:
        return schema
    rest = [o for o in options if o != {"type": "null"}]
    if len(rest) != 1:
        return {**schema, "anyOf": rest}
    kept = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
    return {**rest[0], **kept}


def _phrase(status: str) -> str:
    try:
        return HTTPStatus(int(status)).phrase
    except ValueError:
        return "Error"


def _error_content() -> dict[str, Any]:
    return {"application/json": {"schema": dict(ERROR_REF)}}


def _declare(responses: dict[str, Any], status: str) -> None:
    responses.setdefault(status, {"description": DESCRIPTIONS[status], "content": _error_content()})


def _fix_operation(op: dict[str, Any]) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    parameters = op.get("parameters", [])
    for param in parameters:
        if "schema" in param:
            param["schema"] = _strip_null(param["schema"])
    if op.get("security"):
        _declare(responses, "401")
    if any(p.get("in") == "path" for p in parameters):
        _declare(responses, "404")
    if "requestBody" in op:
        _declare(responses, "413")
    if parameters or "requestBody" in op:
        _declare(responses, "422")
    for status, response in responses.items():
        if status[:1] not in ("4", "5"):
            continue
        content = response.setdefault("content", {})
        body = content.get("application/json")
        ref = (body or {}).get("schema", {}).get("$ref", "")
        if body is None or not body.get("schema") or ref.endswith("/HTTPValidationError"):
            content["application/json"] = {"schema": dict(ERROR_REF)}
        generic = ("", "Validation Error", "Additional Response", _phrase(status))
        if response.get("description", "") in generic:
            response["description"] = DESCRIPTIONS.get(status, _phrase(status))


def tell_the_truth(document: dict[str, Any]) -> dict[str, Any]:
    """The document FastAPI generates, made to say what the API answers (see the module docstring)."""
    document = copy.deepcopy(document)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    error_schema = ErrorOut.model_json_schema(ref_template=SCHEMA_REF)
    for name, definition in error_schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas.setdefault("ErrorOut", error_schema)
    for path_item in document.get("paths", {}).values():
        for method, op in path_item.items():
            if method in OPERATION_METHODS:
                _fix_operation(op)
    return document


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """``app.openapi``: generated once, post-processed, cached."""
    if app.openapi_schema is None:
        generated = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
            servers=app.servers,
        )
        app.openapi_schema = tell_the_truth(generated)
    return app.openapi_schema


def install(app: FastAPI) -> None:
    """Every ``HTTPException`` in the one shape, and the document that declares it. (The handlers of
    request validation, ``UserError``, ``IllegalTransition`` and ``ObjectNotFound`` in ``api.app``
    answer the same shape.)"""
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
