"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) served from files installed with the service, not a CDN.

FastAPI's default pages load Swagger UI's script and stylesheet and ReDoc's script from a public CDN, so
on an on-premises or air-gapped machine they render blank. The assets come from the ``fastapi-offline``
package (MIT; it ships ``swagger-ui-bundle.js``, ``swagger-ui.css``, ``redoc.standalone.js`` and a
favicon, nothing else): a pinned PyPI dependency of the ``service`` extra instead of megabytes of vendored
JavaScript in this repository. Only its static folder is used; the app itself stays ours.

Decisions: the pages and the assets need no API key (they hold nothing of a tenant; the OpenAPI document
they read is public already) and are not operations of the API, so they are left out of the OpenAPI
document. ReDoc is told not to fetch Google Fonts. No OAuth2 redirect page: the API authenticates with
bearer keys, which Swagger UI's "Authorize" dialog sets without one.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
ASSETS_PATH = "/static/docs"
# The pages may load only from this server (ReDoc's bundle hard-codes a logo on a CDN: the browser drops
# that request instead of making it). Inline script/style: FastAPI's page starts Swagger UI inline and
# ReDoc styles itself at run time; blob: workers: ReDoc's search index.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def assets_dir() -> str:
    """The folder of Swagger UI and ReDoc files installed with ``fastapi-offline``."""
    return str(files("fastapi_offline") / "static")


def install(app: FastAPI) -> None:
    """Serve the two documentation pages and their assets; create ``app`` with ``docs_url=None`` and
    ``redoc_url=None`` so FastAPI's CDN-backed pages are not registered first."""
    app.mount(ASSETS_PATH, StaticFiles(directory=assets_dir()), name="docs-assets")

    def prefix(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = prefix(request)
        page = get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )
        page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return page

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = prefix(request)
        page = get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return page
