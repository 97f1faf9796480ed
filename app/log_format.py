"""DDPM_LOG_FORMAT: how the API and the workers write their logs.

"text" (the default) leaves the formats people read (uvicorn's, Celery's). "json" writes one JSON
object per line (python-json-logger) for log collectors: `time`, `level`, `logger`, `message`,
`exc_info` when there is a traceback, and, where known, `job_id`, `attempt` and `worker`.

Those three come from context variables: `log_scope` opens a scope (a Celery task, an API
request is not one) and `bind_log` fills it in once the values are known (a claim knows its
attempt). A thread started for the attempt carries them when it runs in a copy of the starting
thread's context (`contextvars.copy_context().run`, as the lease's heartbeat does). `worker` also
has a process-wide value (`set_worker`): the worker's name, on every line a worker process writes.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from app.config import Settings

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("ddpm_job_id", default=None)
_attempt: contextvars.ContextVar[int | None] = contextvars.ContextVar("ddpm_attempt", default=None)
_worker: contextvars.ContextVar[str | None] = contextvars.ContextVar("ddpm_worker", default=None)
_process_worker: str | None = None

JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
RENAMED = {"asctime": "time", "levelname": "level", "name": "logger"}
# Attributes some libraries put on records that are not worth a field (uvicorn's colour prefix).
IGNORED = ("color_message",)


def set_worker(name: str | None) -> None:
    """This process is worker `name` (host:pid): every line it writes says so."""
    global _process_worker
    _process_worker = name


def bind_log(*, job_id: uuid.UUID | str | None = None, attempt: int | None = None, worker: str | None = None) -> None:
    """Fill in the current scope's fields (left as they are when not given)."""
    if job_id is not None:
        _job_id.set(str(job_id))
    if attempt is not None:
        _attempt.set(attempt)
    if worker is not None:
        _worker.set(worker)


@contextmanager
def log_scope(*, clear: bool = False) -> Iterator[None]:
    """A scope for bind_log: on the way out the fields are what they were before it (`clear`:
    inside it they start empty)."""
    tokens = [var.set(None if clear else var.get()) for var in (_job_id, _attempt, _worker)]
    try:
        yield
    finally:
        for var, token in zip((_job_id, _attempt, _worker), tokens, strict=True):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Puts the known job_id, attempt and worker on each record (as attributes, so `extra`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (("job_id", _job_id.get()), ("attempt", _attempt.get()), ("worker", _worker.get())):
            if value is None and name == "worker":
                value = _process_worker
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter(JSON_FIELDS, rename_fields=RENAMED, reserved_attrs=[*RESERVED_ATTRS, *IGNORED])


def use_json(handler: logging.Handler) -> None:
    """Make `handler` write JSON lines with the context's fields."""
    handler.setFormatter(json_formatter())
    if not any(isinstance(f, ContextFilter) for f in handler.filters):
        handler.addFilter(ContextFilter())


def configure_logging(settings: Settings, level: int = logging.INFO) -> None:
    """JSON lines on stderr from the root logger when DDPM_LOG_FORMAT=json; nothing otherwise."""
    if settings.log_format != "json":
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    use_json(handler)
    root.addHandler(handler)
    root.setLevel(level)


def uvicorn_log_config(settings: Settings) -> dict[str, Any] | None:
    """Uvicorn's logging configuration for DDPM_LOG_FORMAT=json (None: uvicorn's own, text).

    Its loggers and the root logger (the service's own modules) all write JSON: errors to stderr,
    the access log to stdout, as uvicorn's text configuration does."""
    if settings.log_format != "json":
        return None
    formatter = {"()": json_formatter}
    filters = {"context": {"()": ContextFilter}}

    def handler(stream: str) -> dict[str, Any]:
        return {"class": "logging.StreamHandler", "formatter": "json", "filters": ["context"], "stream": stream}

    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": formatter},
        "filters": filters,
        "handlers": {"default": handler("ext://sys.stderr"), "access": handler("ext://sys.stdout")},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["default"], "level": "INFO"},
    }
