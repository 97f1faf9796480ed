"""A real HTTP receiver for webhook tests: it verifies each delivery's Standard Webhooks signature
with the endpoint's secret (the `standardwebhooks` package's verifier) and keeps what it got."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    """Deliveries as they arrived: (webhook-id, payload) of each verified one; refused ones counted."""

    secret: str | None = None
    answer: int = 204  # the status code the receiver answers with
    headers: dict[str, str] = field(default_factory=dict)  # extra answer headers (Location, ...)
    verified: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def events(self) -> list[tuple[str, Any]]:
        with self.lock:
            return [(p["type"], p["data"].get("step")) for _, p in self.verified]


def _handler(received: Received) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k: v for k, v in self.headers.items()}
            try:
                payload = Webhook(received.secret or "").verify(body, headers)
                with received.lock:
                    received.verified.append((headers["webhook-id"], payload))
            except (WebhookVerificationError, ValueError) as exc:
                with received.lock:
                    received.unverified.append(f"{exc}: {body[:100]!r}")
            self.send_response(received.answer)
            for name, value in received.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextmanager
def receiving(received: Received, port: int = 0) -> Iterator[int]:
    """Serve on 127.0.0.1 (`port`, or a free one) until the block ends; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(received))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
