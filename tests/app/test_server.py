"""The served configuration (app/server.py) against a real `ddpm-jobs api` process and real sockets:
clients that trickle a request's head or body are dropped at the deadline, a head over the limit is
431 before the rest of it is sent, and responses (an event stream) have no deadline."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from app.config import Settings
from tests.app.test_events import Rows
from tests.conftest import ApiUser, service_env
from tests.e2e.conftest import api_argv, free_port, process, wait_ready

DEADLINE_S = 2.0  # both the head's and the body's, for this module's API


@pytest.fixture(scope="module")
def api(service_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(host, port) of a real API with 2 s read deadlines and the default 16 KiB head limit."""
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    env = service_env(service_settings) | {
        "DDPM_PORT": str(port),
        "DDPM_HEADER_TIMEOUT_S": str(DEADLINE_S),
        "DDPM_BODY_TIMEOUT_S": str(DEADLINE_S),
    }
    with process(api_argv(), env, log) as proc:
        wait_ready(f"http://127.0.0.1:{port}", proc, log)
        yield "127.0.0.1", port


def trickle(
    address: tuple[str, int], first: bytes, then: bytes, give_up_s: float = 3 * DEADLINE_S
) -> tuple[float, bytes]:
    """Send `first`, then `then` one byte a second (until shortly before the deadline) until the
    server answers and closes the connection; (seconds from connecting to the close, what the
    server sent)."""
    with socket.create_connection(address) as sock:
        started = time.monotonic()
        sock.sendall(first)
        received, position = b"", 0
        while time.monotonic() - started < give_up_s:
            if select.select([sock], [], [], 1.0)[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    return time.monotonic() - started, received
                received += chunk
            elif position < len(then) and time.monotonic() - started < DEADLINE_S - 0.5:
                # Nothing is sent near the deadline: bytes arriving after the server has closed
                # would make its kernel answer with a reset, which can drop the 408 before it is read.
                sock.sendall(then[position : position + 1])
                position += 1
    pytest.fail(f"still connected after {give_up_s} s; the server sent {received!r}")


@pytest.mark.e2e
class TestReadDeadlines:
    @pytest.mark.parametrize(
        ("first", "then"),
        [(b"", b""), (b"GET /healthz HTTP/1.1\r\nHost: api\r\n", b"X-Slow: " + b"a" * 20)],
        ids=["silent", "one-header-byte-a-second"],
    )
    def test_a_slow_head_is_408_and_closed_at_the_deadline(
        self, api: tuple[str, int], first: bytes, then: bytes
    ) -> None:
        elapsed, answer = trickle(api, first, then)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert DEADLINE_S - 0.5 < elapsed < DEADLINE_S + 1.5

    def test_a_slow_body_is_408_and_closed_at_the_deadline(self, api: tuple[str, int], alice: ApiUser) -> None:
        head = (
            "POST /v1/jobs HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nContent-Length: 40\r\n"
            f"Authorization: Bearer {alice.key}\r\n\r\n"
        )
        elapsed, answer = trickle(api, head.encode(), b"{" + b" " * 38 + b"}")
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert DEADLINE_S - 0.5 < elapsed < DEADLINE_S + 1.5

    def test_a_head_over_the_limit_is_431_before_the_rest_is_sent(self, api: tuple[str, int]) -> None:
        # The first 64 KiB of a 1 MiB Authorization header, and no end of the head: a server that
        # read heads of any size would still be waiting for the rest.
        with socket.create_connection(api, timeout=5) as sock:
            sock.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer " + b"a" * 65536)
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")

    def test_responses_and_kept_alive_connections_have_no_deadline(
        self, api: tuple[str, int], clean_db: Settings, alice: ApiUser
    ) -> None:
        host, port = api
        with httpx.Client(base_url=f"http://{host}:{port}", headers=alice.headers, timeout=10) as client:
            job_id = client.post("/v1/jobs", json={}).json()["id"]
            assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # the same connection, kept alive
            with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                chunks = r.iter_text()
                assert "event: status" in next(chunks)
                time.sleep(DEADLINE_S + 1)  # the stream outlives both deadlines
                Rows(clean_db, job_id).status("succeeded")
                rest = "".join(chunks)
        assert '"status":"succeeded"' in rest
