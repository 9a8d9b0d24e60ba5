"""The web dashboard: one HTML page, a few ES modules and the chart library, served from this origin.

The page is a client of the public API like any other: it holds no server state and reads the tenant's
jobs, teachers and datasets with the API key pasted at sign-in (kept in the tab's sessionStorage, sent as
``Authorization: Bearer``; never in a URL or a cookie, so no route here reads credentials). Nothing is
fetched from another host: the chart library (uPlot) is installed from the npm registry by
``scripts/setup.sh`` into ``ui/node_modules`` and served from there.

Decisions: only the files listed in ``ASSETS`` are served (no directory listing, no path from the
request reaches the file system); every answer carries a strict Content-Security-Policy (scripts and
styles from this origin only, no inline script, requests to this origin only); the pages need no key and
are left out of the OpenAPI document, like ``/docs``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

router = APIRouter(include_in_schema=False)

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "api" / "static" / "ui"
VENDOR = ROOT / "ui" / "node_modules" / "uplot" / "dist"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# name under /ui/ -> file; the page's own files, then the chart library's distribution files
ASSETS: dict[str, Path] = {
    "index.html": STATIC / "index.html",
    **{p.name: p for p in (STATIC.iterdir() if STATIC.is_dir() else ()) if p.suffix in MEDIA_TYPES},
    "vendor/uPlot.iife.min.js": VENDOR / "uPlot.iife.min.js",
    "vendor/uPlot.min.css": VENDOR / "uPlot.min.css",
}


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("ui/", status_code=307)


@router.get("/ui")
def ui_without_slash() -> RedirectResponse:
    return RedirectResponse("ui/", status_code=307)


@router.get("/ui/")
def dashboard() -> FileResponse:
    """The single page; the views (jobs, a job, teachers, datasets) are chosen by the URL's #fragment."""
    return asset("index.html")


@router.get("/ui/{name:path}")
def asset(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise HTTPException(404, detail=f"no dashboard file {name[:64]!r}")
    if not path.is_file():  # installed without the source tree's files, or setup.sh's npm step not run
        if name.startswith("vendor/"):
            detail = "the dashboard's chart library is not installed: run scripts/setup.sh (npm ci in ui/)"
        else:
            detail = "the dashboard's files are not installed with this server: run it from the source tree"
        raise HTTPException(503, detail=detail)
    return _file(path)
