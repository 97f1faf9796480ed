"""The web dashboard: static HTML, CSS and JS modules served at `/`, no build step.

The page and its files hold no data, so they need no key; the page itself reads the key from
`#key=...` (never sent to the server) or localStorage and sends it as a Bearer header on every
`/v1` call. Front-end libraries are vendored under `static/vendor/` (no CDN).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"

# The page loads nothing from elsewhere: scripts, styles and fetches stay on this origin;
# images are this origin's or blob: URLs made from authenticated fetches.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
# Files are revalidated (ETag) on every load, so an upgraded service never runs stale JS.
_REVALIDATE = {"Cache-Control": "no-cache"}


class _DashboardFiles(StaticFiles):
    def file_response(
        self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(_REVALIDATE)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at `/` and its files under `/static/`."""
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        # An install without the package data: the API still serves; `/` says what is missing.
        missing = f"the dashboard's files are not installed ({STATIC_DIR}): package app/web/static with the app"
        log.error(missing)

        @app.get("/", include_in_schema=False)
        def dashboard_missing() -> PlainTextResponse:
            return PlainTextResponse(missing, status_code=503)

        return

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(
            index,
            media_type="text/html; charset=utf-8",
            headers={
                **_REVALIDATE,
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff",
            },
        )

    app.mount("/static", _DashboardFiles(directory=STATIC_DIR), name="static")
