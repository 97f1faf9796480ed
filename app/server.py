"""How the API is served (`ddpm-jobs api` and `serve`): uvicorn on h11, with read deadlines and a
limit on the size of a request's head.

Uvicorn reads a request for as long as the client keeps sending: a header line or a body byte
every few seconds holds a connection (and its slot) for ever, and on httptools a head of any size
is read whole. Here a client must send:

- the request's head (request line and headers) within `header_timeout_s` of opening the
  connection, or of the previous response on a kept-alive one;
- its body within `body_timeout_s` of the head;
- a head of at most `max_header_bytes`: past that it gets 431 at once, before the rest is read.

A data set upload (POST /v1/datasets, PATCH /v1/datasets/{id}/upload) may take hours: its body
has no overall deadline, but `body_timeout_s` between two of its chunks (a trickling or silent
client is still cut off; time the server itself is behind, reading paused, does not count).

A client past a deadline gets 408 (unless its response has begun) and the connection closes.
Responses have no deadline: an event stream or a slow download lasts as long as it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import h11
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.config import Settings
from app.datasets.uploads import is_upload_request
from app.log_format import uvicorn_log_config

Reading = Literal["head", "body"]
# What the client is sending while the server waits for it, by h11's state of the client.
_READING: dict[object, Reading] = {h11.IDLE: "head", h11.SEND_BODY: "body"}


@dataclass(frozen=True)
class ReadLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> ReadLimits:
        return cls(settings.header_timeout_s, settings.body_timeout_s, settings.max_header_bytes)


class _Connection(h11.Connection):
    """h11's connection, remembering why it refused a request (uvicorn answers every refusal 400)."""

    refusal: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = exc
            raise


class DeadlineH11Protocol(H11Protocol):
    """Uvicorn's h11 protocol with a deadline on each request's head and body (see the module)."""

    def __init__(self, *args: Any, limits: ReadLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.conn = _Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._reading: Reading | None = None
        self._deadline: asyncio.TimerHandle | None = None
        # An upload's body: its deadline is an idle one, from the last bytes that came.
        self._upload = False
        self._last_bytes_at = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._follow_client()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_client()
        if self._upload:
            self._last_bytes_at = self.loop.time()  # read when the deadline fires (no timer per chunk)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self._wait_for(None)
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        refusal = self.conn.refusal if isinstance(self.conn, _Connection) else None
        if refusal is not None and refusal.error_status_hint == 431:
            self._answer(431, f"request headers over {self.limits.max_header_bytes} bytes")
        else:
            super().send_400_response(msg)

    def _follow_client(self) -> None:
        self._wait_for(_READING.get(self.conn.their_state))

    def _wait_for(self, reading: Reading | None) -> None:
        """Arm the deadline of what the client now owes us (None: nothing, the server is busy)."""
        if reading == self._reading:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._reading = reading
        self._upload = reading == "body" and self._streams_upload()
        self._last_bytes_at = self.loop.time()
        if reading is not None:
            timeout = self.limits.header_timeout_s if reading == "head" else self.limits.body_timeout_s
            self._deadline = self.loop.call_later(timeout, self._expired, reading, timeout)

    def _streams_upload(self) -> bool:
        scope = getattr(self, "scope", None)
        if scope is None:
            return False
        content_type = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"), None)
        return is_upload_request(scope["method"], scope["path"], content_type)

    def _expired(self, reading: Reading, timeout: float) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._upload and reading == "body":
            # Bytes came within the last `timeout`, or the application has not read what came
            # (reading paused: the server's delay, not the client's): the deadline moves on.
            idle = self.loop.time() - self._last_bytes_at
            if idle < timeout or self.flow.read_paused:
                wait = timeout if self.flow.read_paused else timeout - idle
                self._deadline = self.loop.call_later(wait, self._expired, reading, timeout)
                return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        self.logger.info("%s: request %s not received within %g s; closing the connection", client, reading, timeout)
        if reading == "head" or not self.cycle.response_started:
            self._answer(408, f"the request {reading} did not arrive within {timeout:g} s")
        else:
            self.transport.close()

    def _answer(self, status: int, message: str) -> None:
        """A plain-text answer written as is, then the connection closes (h11 may be past sending)."""
        body = message.encode()
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


class _Server(uvicorn.Server):
    """Uvicorn's server, calling `on_started` once it listens (after its "running on" line)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None) -> None:
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()


def serve_api(settings: Settings, on_started: Callable[[], None] | None = None) -> None:
    """Serve the API on settings.host:settings.port until stopped; `on_started` (which must not
    block) is called once it listens.

    A SIGTERM or SIGINT stops it gracefully; uvicorn then raises the signal again with the
    handler that was in place before it started (the default one ends the process at once: a
    caller with cleanup to do installs its own, as `ddpm-jobs serve` does)."""
    # DDPM_LOG_FORMAT=json: uvicorn's loggers and the service's own write JSON lines (app/log_format.py).
    logs = {"log_config": log_config} if (log_config := uvicorn_log_config(settings)) else {}
    config = uvicorn.Config(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level="info",
        http=partial(DeadlineH11Protocol, limits=ReadLimits.of(settings)),  # type: ignore[arg-type]
        **logs,
    )
    server = _Server(config, on_started)
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT, raised again after shutdown (as uvicorn.run)
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
