"""The metrics the API processes count themselves: request durations and live SSE watchers.

Without PROMETHEUS_MULTIPROC_DIR they live in this process (PROCESS_REGISTRY). With it, which
must be set before prometheus_client is first imported, prometheus-client keeps every value in a
memory-mapped file per process under that folder and `scrape_registry` adds the files of every
process up: several API processes on one host, any of them scraped, report the sum. The folder
must start empty (stale files of dead processes would be counted): `ddpm-jobs serve` makes a
fresh one, compose mounts a tmpfs there.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, Histogram, multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# Routes answered in milliseconds up to uploads and downloads of minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# The label of a request no route matched (404s of random paths): one value, not one per path.
UNMATCHED = "<unmatched>"
# Methods a client may send are any token: others are counted as "OTHER", one label value.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_DURATION = Histogram(
    "ddpm_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response, by route template (not the raw path). "
    "An event stream counts when it ends.",
    ["method", "route", "status"],
    buckets=DURATION_BUCKETS,
    registry=PROCESS_REGISTRY,
)
SSE_WATCHERS = Gauge(
    "ddpm_sse_watchers",
    "Open event streams (GET /v1/jobs/{id}/events), summed over the API processes that are alive.",
    registry=PROCESS_REGISTRY,
    multiprocess_mode="livesum",
)


def multiprocess_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_VARIABLE)
    return Path(value) if value else None


def scrape_registry() -> CollectorRegistry:
    """A fresh registry for one scrape, holding this host's API-process metrics: every process's
    (multiprocess mode), or this one's."""
    registry = CollectorRegistry()
    if multiprocess_dir() is None:
        registry.register(_ThisProcess())
    else:
        multiprocess.MultiProcessCollector(registry)
    return registry


class _ThisProcess(Collector):
    def collect(self) -> Iterable[Metric]:
        return PROCESS_REGISTRY.collect()


def process_exited(pid: int | None = None) -> None:
    """An API process stops: its live gauges (SSE watchers) stop counting (multiprocess mode)."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(pid or os.getpid())


def route_template(scope: Scope) -> str:
    """The path template of the route that answered `scope` (`/v1/jobs/{job_id}`), or UNMATCHED.

    Starlette's router leaves the route it chose in the scope."""
    route = scope.get("route")
    return getattr(route, "path_format", None) or getattr(route, "path", None) or UNMATCHED


class RequestDurations:
    """ASGI middleware: every HTTP request's duration into HTTP_DURATION, labelled by its route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # no response started: the server answers 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            HTTP_DURATION.labels(method, route_template(scope), str(status)).observe(time.perf_counter() - start)


async def watched(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """`stream`, counted in SSE_WATCHERS while it is open."""
    SSE_WATCHERS.inc()
    try:
        async for text in stream:
            yield text
    finally:
        SSE_WATCHERS.dec()
