"""``/docs`` and ``/redoc`` render every operation in headless Chromium that cannot reach the internet.

The app (embedded SQLite stack: the pages need no PostgreSQL) runs under a real uvicorn on loopback; the
browser resolves every other host name to nothing and has a dead proxy, so a page that needs a CDN stays
blank and fails here. Every request the browser made is read back from its network log: all of them must
go to the loopback server. Chromium and its driver are Debian's (``scripts/setup.sh`` installs them);
when they are missing the test fails and says so, it is never skipped. Screenshots of both pages are kept
in the test's ``tmp_path``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from live_server import serve
from offline_browser import start_offline_chromium

from api.app import create_app
from service.settings import Settings

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.timeout(120),
]

RENDER_S = 45  # generous on 2 busy cores: "renders at all", not a speed target
OPERATION_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture
def app(tmp_path: Path) -> Any:
    settings = Settings(var_dir=tmp_path / "var", data_root=tmp_path / "data")
    return create_app(settings, enqueue=lambda job_id: None, revoke=lambda job_id: None)


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Headless Chromium with no way off this machine: every host but 127.0.0.1 resolves to nothing and
    anything that would still go out meets a proxy on a closed port."""
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    driver = start_offline_chromium()
    try:
        yield driver
    finally:
        driver.quit()


def _requests_sent(driver: Any) -> list[str]:
    """Every URL the page sent a request for (failed ones too), from the DevTools network log; requests
    the page's Content-Security-Policy blocked are left out: those never leave the browser."""
    urls: dict[str, str] = {}
    blocked: set[str] = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message.get("method") == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif message.get("method") == "Network.loadingFailed" and params.get("blockedReason") == "csp":
            blocked.add(params["requestId"])
    return [url for request_id, url in urls.items() if request_id not in blocked]


def _off_machine(urls: list[str], port: int) -> list[str]:
    local = f"127.0.0.1:{port}"
    return [u for u in urls if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).netloc != local]


def _operations(app: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path, operation) of every operation in the app's OpenAPI document."""
    paths: dict[str, Any] = app.openapi()["paths"]
    return [(m.upper(), p, op) for p, ops in paths.items() for m, op in ops.items() if m in OPERATION_METHODS]


def test_docs_and_redoc_render_every_operation_offline(app: Any, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    operations = {(method, path) for method, path, _ in _operations(app)}
    ids = {op["operationId"] for _, _, op in _operations(app)}
    summaries = {op["summary"] for _, _, op in _operations(app)}
    assert ("POST", "/v1/jobs") in operations and ("POST", "/v1/teachers") in operations
    with serve(app) as port:
        base = f"http://127.0.0.1:{port}"

        # Swagger UI: one .opblock per operation, with its method and path; styled by the local CSS.
        browser.get(f"{base}/docs")
        WebDriverWait(browser, RENDER_S).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= len(operations)
        )
        shown = {
            (
                block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text.strip(),
                block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"),
            )
            for block in browser.find_elements(By.CSS_SELECTOR, ".opblock")
        }
        assert shown == operations
        border = browser.execute_script(
            "return getComputedStyle(document.querySelector('.opblock')).borderTopStyle"
        )
        assert border == "solid", "swagger-ui.css did not apply"
        browser.save_screenshot(str(tmp_path / "docs.png"))
        docs_urls = _requests_sent(browser)

        # ReDoc: one section per operation, keyed by its operationId, with the summary as its heading.
        browser.get(f"{base}/redoc")
        WebDriverWait(browser, RENDER_S).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-section-id*='operation/']")) >= len(ids)
        )
        sections = [
            s.get_attribute("data-section-id")
            for s in browser.find_elements(By.CSS_SELECTOR, "[data-section-id*='operation/']")
        ]
        assert {s.rsplit("operation/", 1)[1] for s in sections} == ids
        headings = {h.text.strip() for h in browser.find_elements(By.CSS_SELECTOR, "[data-section-id] h2")}
        assert summaries <= headings, sorted(summaries - headings)
        browser.save_screenshot(str(tmp_path / "redoc.png"))
        redoc_urls = _requests_sent(browser)

    assert any(u.endswith("/static/docs/swagger-ui-bundle.js") for u in docs_urls), docs_urls
    assert any(u.endswith("/static/docs/redoc.standalone.js") for u in redoc_urls), redoc_urls
    assert _off_machine(docs_urls, port) == [], "the Swagger UI page reached off the machine"
    assert _off_machine(redoc_urls, port) == [], "the ReDoc page reached off the machine"


def test_doc_pages_and_assets_stay_out_of_the_openapi_document(app: Any) -> None:
    """The pages are not operations of the API: the document (and so the fuzz test) never sees them."""
    paths = app.openapi()["paths"]
    assert not [p for p in paths if p.startswith(("/docs", "/redoc", "/static"))]
