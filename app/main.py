"""create_app: the FastAPI application. Never imports torch, diffusers or the worker."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app import health
from app.auth.service import ensure_bootstrap_key
from app.checkpoints import endpoints as checkpoint_endpoints
from app.checkpoints.store import make_store
from app.config import Settings, get_settings
from app.datasets import endpoints as dataset_endpoints
from app.datasets.service import DatasetConflict, DatasetNotFound, DatasetTooLarge
from app.db import make_engine, make_sessionmaker, session_scope
from app.evaluations import endpoints as evaluation_endpoints
from app.events import endpoints as event_endpoints
from app.events.hub import EventHub
from app.job_events import endpoints as job_event_endpoints
from app.jobs import endpoints as job_endpoints
from app.jobs.limits import SpecRefused
from app.jobs.service import IdempotencyConflict, InvalidTransition, JobNotFound, QuotaExceeded
from app.logs import endpoints as log_endpoints
from app.metrics import endpoints as metric_endpoints
from app.monitoring import endpoints as monitoring_endpoints
from app.monitoring.process import RequestDurations, process_exited
from app.queue import Dispatcher
from app.samples import endpoints as sample_endpoints
from app.usage import endpoints as usage_endpoints
from app.web import mount_dashboard
from app.web.docs import mount_docs
from app.webhooks import endpoints as webhook_endpoints
from app.webhooks.service import TooManyWebhooks, WebhookNotFound

log = logging.getLogger(__name__)
# Seconds a client is asked to wait after a 503: no free database connection, or none at all.
POOL_RETRY_AFTER_S = 2


def _json_safe(value: Any) -> Any:
    """What a client sent, made fit to echo in a JSON answer, whatever it was.

    NaN and infinity are not JSON: they go back as strings. A string UTF-8 cannot encode (a
    lone surrogate, which JSON's `\\ud800` escape can carry, in a value or a key) goes back
    with a backslash escape in its place, so a 422 always serialises.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _echo(errors: Any) -> Any:
    """Validation errors as a JSON-ready value: a body that is not UTF-8 comes back as bytes,
    which are decoded with escapes rather than failing (jsonable_encoder's own decode would)."""
    encoded = jsonable_encoder(errors, custom_encoder={bytes: lambda b: b.decode("utf-8", "backslashreplace")})
    return _json_safe(encoded)


def _operation_id(route: APIRoute) -> str:
    """Operation ids are the route functions' names (`create_job`, `get_job`, ...)."""
    return route.name


def apply_bootstrap_key(settings: Settings, app: FastAPI) -> None:
    """DDPM_BOOTSTRAP_API_KEY: make sure that key exists as an admin key (compose, scripts)."""
    if not settings.bootstrap_api_key:
        return
    try:
        with session_scope(app.state.sessionmaker) as session:
            created = ensure_bootstrap_key(session, settings.secret_key, settings.bootstrap_api_key)
    except IntegrityError:
        # Another API replica stored it first; make sure it is the same key.
        with session_scope(app.state.sessionmaker) as session:
            created = ensure_bootstrap_key(session, settings.secret_key, settings.bootstrap_api_key)
    if created:
        log.info("stored DDPM_BOOTSTRAP_API_KEY as an admin key")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        apply_bootstrap_key(settings, app)
        yield
        app.state.dispatcher.drain()  # tasks handed to its sender thread still go out
        app.state.engine.dispose()  # the pool's connections close now, not when the app is collected
        process_exited()  # its live SSE watchers stop counting in GET /metrics

    app = FastAPI(
        title="ddpm-jobs",
        version="0.1.0",
        summary="Train denoising diffusion models (DDPM) on request.",
        description="Every route but `/healthz` and `/readyz` needs `Authorization: Bearer <API key>`.",
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
        # Bodies over the limit are 413 before they are parsed: a Content-Length over it is
        # refused before the body is read, a body without one as soon as it passes it.
        max_body_size=settings.max_request_bytes,
        # Served from this package by mount_docs (no CDN: the pages work offline).
        docs_url=None,
        redoc_url=None,
    )
    engine = make_engine(settings)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    # Sends on a background thread: a submit never waits for the broker (app/queue.py).
    app.state.dispatcher = Dispatcher(settings, in_background=True)
    app.state.checkpoint_store = make_store(settings)
    app.state.event_hub = EventHub(app.state.sessionmaker, settings, poll_interval_s=settings.events_poll_interval_s)

    app.include_router(health.router)
    app.include_router(job_endpoints.router)
    app.include_router(metric_endpoints.router)
    app.include_router(checkpoint_endpoints.router)
    app.include_router(sample_endpoints.router)
    app.include_router(evaluation_endpoints.router)
    app.include_router(event_endpoints.router)
    app.include_router(log_endpoints.router)
    app.include_router(job_event_endpoints.router)
    app.include_router(dataset_endpoints.router)
    app.include_router(usage_endpoints.router)
    app.include_router(webhook_endpoints.router)
    app.include_router(monitoring_endpoints.router)
    app.add_middleware(RequestDurations)
    mount_dashboard(app)
    mount_docs(app)

    add_error_handlers(app)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """How the service's own errors become HTTP answers: 4xx naming the problem, 503 for a
    database that is away or busy (never a 500)."""

    add_dataset_error_handlers(app)

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _echo(exc.errors())}, status_code=422)

    @app.exception_handler(JobNotFound)
    @app.exception_handler(WebhookNotFound)
    def _not_found(_: Request, exc: LookupError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(SpecRefused)
    def _over_limit(_: Request, exc: SpecRefused) -> JSONResponse:
        return JSONResponse({"detail": _echo(exc.errors)}, status_code=422)

    @app.exception_handler(QuotaExceeded)
    @app.exception_handler(TooManyWebhooks)
    def _quota(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429)

    @app.exception_handler(IdempotencyConflict)
    @app.exception_handler(InvalidTransition)
    def _conflict(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    def _database_down(_: Request, exc: DBAPIError) -> JSONResponse:
        # A connection-level failure is the database being away, not the client's fault.
        if isinstance(exc, OperationalError) or exc.connection_invalidated:
            log.warning("database unavailable: %s", exc.orig)
            return JSONResponse(
                {"detail": "database unavailable; retry shortly"},
                status_code=503,
                headers={"Retry-After": str(POOL_RETRY_AFTER_S)},
            )
        raise exc

    @app.exception_handler(PoolTimeout)
    def _pool_exhausted(_: Request, exc: PoolTimeout) -> JSONResponse:
        # Every pooled connection stayed busy for DDPM_DB_POOL_TIMEOUT_S: load, not the client's fault.
        log.warning("database connection pool exhausted: %s", exc)
        return JSONResponse(
            {"detail": "the service is busy (no free database connection); retry shortly"},
            status_code=503,
            headers={"Retry-After": str(POOL_RETRY_AFTER_S)},
        )


def add_dataset_error_handlers(app: FastAPI) -> None:
    """The data set routes' own errors (app/datasets/service.py)."""

    @app.exception_handler(DatasetNotFound)
    def _no_dataset(_: Request, exc: DatasetNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(DatasetConflict)
    def _dataset_conflict(_: Request, exc: DatasetConflict) -> JSONResponse:
        # A resumable upload's true offset, for the client to continue from (Upload-Offset).
        headers = {"Upload-Offset": str(exc.offset)} if exc.offset is not None else None
        return JSONResponse({"detail": str(exc)}, status_code=409, headers=headers)

    @app.exception_handler(DatasetTooLarge)
    def _too_large(_: Request, exc: DatasetTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)
