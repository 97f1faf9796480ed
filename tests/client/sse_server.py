"""A tiny scripted HTTP/1.1 server for the event-stream client: connection N gets reply N,
sent in chunks, then ended cleanly or dropped mid-body. It records each request's headers."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Reply:
    chunks: list[str] = field(default_factory=list)
    end: Literal["clean", "drop"] = "clean"  # drop: close without the final chunk (a broken connection)
    status: int = 200
    detail: str = ""


def sse(event: str, data: dict, event_id: str | None = None) -> str:
    return f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "") + f"data: {json.dumps(data)}\n\n"


class ScriptedServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, replies: list[Reply]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replies = list(replies)
        self.requests: list[dict[str, str]] = []
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(socketserver.StreamRequestHandler):
    server: ScriptedServer

    def handle(self) -> None:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = self.rfile.readline()
            if not line:
                return
            head += line
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        headers["request-line"] = lines[0]
        with self.server.lock:
            self.server.requests.append(headers)
            reply = self.server.replies.pop(0) if self.server.replies else Reply(status=410, detail="no more replies")
        if reply.status != 200:
            body = json.dumps({"detail": reply.detail}).encode()
            self.wfile.write(
                f"HTTP/1.1 {reply.status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            return
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
        )
        for chunk in reply.chunks:
            data = chunk.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
            time.sleep(0.01)
        if reply.end == "clean":
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)


@contextmanager
def scripted_server(replies: list[Reply]) -> Iterator[ScriptedServer]:
    server = ScriptedServer(replies)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
