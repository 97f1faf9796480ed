from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """The database and the broker answer; 503 naming the one that does not."""
    problems: dict[str, str] = {}
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "not ready"
        problems["database"] = f"unreachable: {type(exc).__name__}: {exc}".splitlines()[0]
    try:
        request.app.state.dispatcher.ping()
    except Exception as exc:
        problems["broker"] = f"unreachable: {type(exc).__name__}: {exc}".splitlines()[0]
    if problems:
        return JSONResponse({"status": "unavailable", "detail": problems}, status_code=503)
    return JSONResponse({"status": "ok"})
