"""The API's documentation pages, `/docs` (Swagger UI) and `/redoc`, with no CDN.

FastAPI's default pages load Swagger UI and ReDoc from a CDN, so they are blank without
internet. These are FastAPI's documented replacements (`docs_url=None`, `redoc_url=None`, routes
that return `get_swagger_ui_html` / `get_redoc_html` with local URLs), serving the files the
`fastapi-offline` package ships (Swagger UI 5, ReDoc 2, a favicon) under `/docs/static/`.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_ASSETS = Path(str(importlib.resources.files("fastapi_offline") / "static"))
ASSETS_URL = "/docs/static"
# Both pages start their library with an inline <script> (FastAPI's templates) and the libraries
# add inline styles; everything else stays on this origin. ReDoc's search runs in a blob: worker.
DOCS_CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
_HEADERS = {
    "Content-Security-Policy": DOCS_CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def mount_docs(app: FastAPI) -> None:
    """`/docs` and `/redoc` from local files. The app is made with docs_url=None, redoc_url=None."""
    app.mount(ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-static")

    # The pages read the app from the request: a closure over `app` would make a reference cycle
    # (app -> route -> app) that keeps the app and its connection pool alive until a full GC.
    def assets(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "")
        return f"{root}{request.app.openapi_url}", f"{root}{ASSETS_URL}"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        openapi_url, static = assets(request)
        page = get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{request.app.title} - Swagger UI",
            swagger_js_url=f"{static}/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui.css",
            swagger_favicon_url=f"{static}/favicon.png",
            # No badge that sends the document to validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers.update(_HEADERS)
        return page

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        openapi_url, static = assets(request)
        page = get_redoc_html(
            openapi_url=openapi_url,
            title=f"{request.app.title} - ReDoc",
            redoc_js_url=f"{static}/redoc.standalone.js",
            redoc_favicon_url=f"{static}/favicon.png",
            with_google_fonts=False,
        )
        page.headers.update(_HEADERS)
        return page
