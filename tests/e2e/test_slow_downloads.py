"""Slow clients against the real API process and PostgreSQL with a small pool: a download holds
no pooled connection while its bytes flow (issue 12, item 1), so readers that take their time,
more of them than the pool holds, never keep other requests waiting."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from app.config import Settings
from tests.app.test_storage import add_checkpoint
from tests.conftest import MakeUser
from tests.e2e.conftest import api_argv, free_port, process, wait_ready

POOL_SIZE, POOL_TIMEOUT_S = 2, 3.0
CHECKPOINT_BYTES = 12 << 20  # more than the API's socket buffers take in, so the transfer stalls


@contextmanager
def slow_reader(port: int, path: str, key: str) -> Iterator[socket.socket]:
    """A download on a socket with a tiny receive buffer, its response begun, the rest unread."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 "), "the download did not start"
        yield sock


def test_slow_downloads_leave_the_pool_to_other_requests(
    clean_db: Settings, make_user: MakeUser, settings_env: dict[str, str], tmp_path: Path
) -> None:
    user = make_user("alice")
    port, log = free_port(), tmp_path / "api.log"
    env = settings_env | {
        "DDPM_PORT": str(port),
        "DDPM_DB_POOL_SIZE": str(POOL_SIZE),
        "DDPM_DB_MAX_OVERFLOW": "0",
        "DDPM_DB_POOL_TIMEOUT_S": str(POOL_TIMEOUT_S),
    }
    base = f"http://127.0.0.1:{port}"
    with process(api_argv(), env, log) as api, httpx.Client(base_url=base, headers=user.headers) as client:
        wait_ready(base, api, log)
        job_id = client.post("/v1/jobs", json={}).json()["id"]
        add_checkpoint(clean_db, job_id, 10, os.urandom(CHECKPOINT_BYTES))
        with ExitStack() as readers:
            sockets = [
                readers.enter_context(slow_reader(port, f"/v1/jobs/{job_id}/checkpoints/10", user.key))
                for _ in range(POOL_SIZE + 2)
            ]
            for _ in range(3):  # a few KB each, now and then: slow, not gone
                for sock in sockets:
                    assert sock.recv(4096)
                started = time.monotonic()
                r = client.get("/v1/jobs", timeout=POOL_TIMEOUT_S * 3)
                waited = time.monotonic() - started
                assert r.status_code == 200, r.text
                assert waited < POOL_TIMEOUT_S / 2, f"GET /v1/jobs waited {waited:.1f}s for a connection"
