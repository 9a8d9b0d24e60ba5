"""One error shape (``ErrorOut``) for every error, and an OpenAPI document that declares what the API answers.

On the embedded stack (SQLite, a local folder); ``tests/integration/test_openapi_fuzz.py`` fuzzes the same
promises on PostgreSQL with schemathesis.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.schemas import ErrorOut
from service.auth import create_api_key
from service.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

METHODS = ("get", "put", "post", "delete", "patch")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict[str, str], dict]]:
    root = tmp_path_factory.mktemp("errors")
    data = root / "data"
    (data / "cifar-10-batches-py-partial").mkdir(parents=True)
    (data / "cifar-10-batches-py-partial" / "batches.meta").write_bytes(b"x")
    settings = Settings(var_dir=root / "var", data_root=data, max_upload_bytes=100_000)
    app = create_app(settings, enqueue=lambda _: None, revoke=lambda _: None)
    with TestClient(app) as client:
        with app.state.session_factory() as session:
            key = create_api_key(session, "alice")
            session.commit()
        yield client, {"Authorization": f"Bearer {key}"}, client.get("/openapi.json").json()


def _operations(doc: dict) -> Iterator[tuple[str, str, dict]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def _declared(doc: dict, path: str, method: str, status: int) -> dict:
    responses = doc["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} does not declare {status}: {sorted(responses)}"
    return responses[str(status)]


def _is_error_out(response: dict) -> bool:
    return response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorOut"}


def test_document_declares_the_one_error_shape(env: tuple[TestClient, dict[str, str], dict]) -> None:
    _, _, doc = env
    assert "HTTPValidationError" not in json.dumps(doc)  # FastAPI's list-valued detail is gone
    assert set(doc["components"]["schemas"]["ErrorOut"]["required"]) == {"detail"}
    for path, method, op in _operations(doc):
        responses = op["responses"]
        if op.get("security"):
            assert _is_error_out(responses["401"]), (method, path)
        if op.get("parameters") or "requestBody" in op:
            assert _is_error_out(responses["422"]), (method, path)
        if "requestBody" in op:
            assert _is_error_out(responses["413"]), (method, path)
        if "{" in path:
            assert _is_error_out(responses["404"]), (method, path)
        for status, response in responses.items():
            if status.startswith("4"):
                assert _is_error_out(response), (method, path, status)
        for param in op.get("parameters", []):
            assert {"type": "null"} not in param["schema"].get("anyOf", []), (method, path, param["name"])


def test_every_error_has_the_shape_and_is_declared(env: tuple[TestClient, dict[str, str], dict]) -> None:
    client, alice, doc = env
    job = client.post("/v1/jobs", headers=alice, json={"method": "sat", "dataset": "cifar10-partial"}).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    json_headers = {**alice, "Content-Type": "application/json"}
    cases: list[tuple[str, str, str, dict[str, Any], int]] = [
        ("get", "/v1/teachers", "/v1/teachers", {}, 401),
        ("get", "/v1/jobs/{job_id}", "/v1/jobs/" + "a" * 32, {"headers": alice}, 404),
        ("get", "/v1/jobs", "/v1/jobs?limit=0", {"headers": alice}, 422),
        ("post", "/v1/jobs", "/v1/jobs", {"headers": alice, "json": {"dataset": "x", "method": "no"}}, 422),
        (
            "post",
            "/v1/jobs",
            "/v1/jobs",
            {"headers": json_headers, "content": b'{"dataset": "\xff\xfe"}'},
            422,
        ),
        ("post", "/v1/jobs/{job_id}/cancel", f"/v1/jobs/{job['id']}/cancel", {"headers": alice}, 409),
        ("post", "/v1/datasets", "/v1/datasets", {"headers": {**alice, "Content-Length": str(10**9)}}, 413),
        (
            "post",
            "/v1/datasets",
            "/v1/datasets",
            {
                "headers": {**alice, "Content-Type": "multipart/form-data; boundary=b"},
                "content": b"--b\r\nx--b--",
            },
            422,
        ),
    ]
    for method, template, url, kwargs, status in cases:
        r = client.request(method.upper(), url, **kwargs)
        assert r.status_code == status, (method, url, r.text)
        assert r.headers["content-type"] == "application/json", (method, url)
        ErrorOut.model_validate(r.json())
        _declared(doc, template, method, status)


def test_a_body_that_cannot_be_parsed_is_a_422_naming_the_body(
    env: tuple[TestClient, dict[str, str], dict],
) -> None:
    """Not UTF-8: the framework's 400 becomes the 422 a JSON syntax error already is."""
    client, alice, _ = env
    r = client.post(
        "/v1/jobs", headers={**alice, "Content-Type": "application/json"}, content=b"\x97\x15\xe3\xa0"
    )
    assert r.status_code == 422
    assert r.json()["errors"] == [{"loc": ["body"], "msg": r.json()["detail"], "type": "body_unparsable"}]


@pytest.mark.parametrize("method", ["OPTIONS", "DELETE", "PUT", "PATCH"])
def test_405_allows_every_method_of_the_path(
    env: tuple[TestClient, dict[str, str], dict], method: str
) -> None:
    """/v1/jobs is two routes (GET, POST); the Allow header names both, as the document does."""
    client, alice, doc = env
    r = client.request(method, "/v1/jobs", headers=alice)
    assert r.status_code == 405
    allowed = {m.strip().lower() for m in r.headers["allow"].split(",")}
    documented = set(doc["paths"]["/v1/jobs"]) & set(METHODS)
    assert allowed - {"head"} == documented == {"get", "post"}
    ErrorOut.model_validate(r.json())


def test_artifact_download_documents_files_and_download_urls(
    env: tuple[TestClient, dict[str, str], dict],
) -> None:
    """report.json answers the file's JSON, presign=true a DownloadUrl: the document must allow both."""
    _, _, doc = env
    content = _declared(doc, "/v1/jobs/{job_id}/artifacts/{name}", "get", 200)["content"]
    assert content["application/octet-stream"]["schema"] == {"type": "string", "format": "binary"}
    options = content["application/json"]["schema"]["anyOf"]
    assert {"url", "expires_in"} <= set(options[0]["properties"])  # DownloadUrl
    assert {"type": "object", "description": "The content of a .json artifact"} in options


def test_idempotency_key_reused_for_another_request_is_422(
    env: tuple[TestClient, dict[str, str], dict],
) -> None:
    """The IETF Idempotency-Key draft: same key + same payload -> the first answer; another payload -> 422."""
    client, alice, _ = env
    headers = {**alice, "Idempotency-Key": "reused"}
    body = {"method": "sat", "dataset": "cifar10-partial", "seed": 1}
    first = client.post("/v1/jobs", headers=headers, json=body)
    assert first.status_code == 201
    same = client.post("/v1/jobs", headers=headers, json={**body, "batch_size": 128})  # a default spelt out
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", headers=headers, json={**body, "seed": 2})
    assert other.status_code == 422
    assert "Idempotency-Key" in other.json()["detail"] and first.json()["id"] in other.json()["detail"]
    listed = [j["id"] for j in client.get("/v1/jobs", headers=alice).json()["items"]]
    assert listed.count(first.json()["id"]) == 1 and all(j != other.json().get("id") for j in listed)


def test_error_out_is_the_model_routes_name(tmp_path: Path) -> None:
    from api import schemas

    assert schemas.Message is schemas.ErrorOut and schemas.NOT_FOUND[404]["model"] is ErrorOut


def test_a_bug_is_a_500_in_the_same_shape(tmp_path: Path) -> None:
    app = create_app(Settings(var_dir=tmp_path / "var", data_root=tmp_path), enqueue=lambda _: None)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError(f"secret {tmp_path}")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert ErrorOut.model_validate(r.json()).detail == "internal error; it was logged"
    assert str(tmp_path) not in r.text
