"""`ddpm usage`, and the ETA and GPU time `ddpm status` and `ddpm watch` show, against mock
transports (the API's own figures are tests/app/test_usage.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from app.client.usage_cli import when
from tests.client.sse_server import sse
from tests.client.test_cli import assert_clean_error, ddpm, event_stream, use_transport

USAGE = {
    "since": "2026-11-01T00:00:00Z",
    "until": "2026-12-01T00:00:00Z",
    "items": [
        {"user_id": "u1", "user": "alice", "gpu_seconds": 9000.0, "attempts": 3, "jobs": 2},
        {"user_id": "u2", "user": "root", "gpu_seconds": 0.0, "attempts": 0, "jobs": 0},
    ],
}


class TestUsage:
    def serve(self, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
        sent: list[dict[str, str]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            assert request.url.path == "/v1/usage"
            sent.append(dict(request.url.params))
            return httpx.Response(200, json=USAGE)

        use_transport(monkeypatch, handler)
        return sent

    def test_a_piped_table_of_each_user(self, monkeypatch: pytest.MonkeyPatch) -> None:
        sent = self.serve(monkeypatch)
        result = ddpm(None, "k", "usage", "--since", "2026-11-01", "--until", "2026-12-01T00:00:00+01:00")
        assert result.exit_code == 0, result.output
        assert sent == [{"since": "2026-11-01", "until": "2026-12-01T00:00:00+01:00"}]
        rows = [line.split() for line in result.stdout.splitlines()]
        assert rows == [
            ["user", "GPU-hours", "GPU-seconds", "attempts", "jobs"],
            ["alice", "2.50", "9,000", "3", "2"],
            ["root", "0.00", "0", "0", "0"],
        ]
        assert result.stderr.startswith("from ")

    def test_json_and_the_default_window(self, monkeypatch: pytest.MonkeyPatch) -> None:
        sent = self.serve(monkeypatch)
        result = ddpm(None, "k", "usage", "--json")
        assert result.exit_code == 0, result.output
        assert (json.loads(result.stdout), sent) == (USAGE, [{}])

    def test_an_age_is_sent_as_the_time_that_long_ago(self) -> None:
        now = datetime(2026, 12, 1, tzinfo=UTC)
        assert when("7d", now) == (now - timedelta(days=7)).isoformat() == "2026-11-24T00:00:00+00:00"
        assert when("1.5h", now) == "2026-11-30T22:30:00+00:00"
        assert when("30m", now) == "2026-11-30T23:30:00+00:00"
        assert (when("2026-11-01", now), when(None, now)) == ("2026-11-01", None)

    def test_a_window_the_server_refuses_is_a_clean_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        detail = [{"loc": ["query", "since"], "msg": "since must be before until", "type": "value_error"}]
        use_transport(monkeypatch, lambda r: httpx.Response(422, json={"detail": detail}))
        assert_clean_error(ddpm(None, "k", "usage", "--since", "tomorrow"), "since must be before until")


RUNNING = {
    "id": "j1",
    "name": None,
    "status": "running",
    "step": 10,
    "total_steps": 40,
    "attempt": 1,
    "loss": 0.5,
    "error": None,
    "cancel_requested": False,
    "spec": {"training": {"batch_size": 50}},
    "gpu_seconds": 5400.0,
    "eta_seconds": 3725.0,
}


def test_status_shows_the_eta_and_the_gpu_time(monkeypatch: pytest.MonkeyPatch) -> None:
    use_transport(monkeypatch, lambda r: httpx.Response(200, json=RUNNING))
    result = ddpm(None, "k", "status", "j1")
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.strip("│ ").split()) for line in result.stdout.splitlines()]
    assert "ETA 01:02:05" in lines
    assert "GPU time 1.50 GPU-hours (5,400 GPU-seconds)" in lines


def test_watch_shows_the_servers_eta_on_a_status_event(monkeypatch: pytest.MonkeyPatch) -> None:
    done = RUNNING | {"status": "succeeded", "step": 40, "eta_seconds": None}
    use_transport(monkeypatch, event_stream(sse("status", RUNNING), sse("status", done)))
    result = ddpm(None, "k", "watch", "j1")
    assert result.exit_code == 0, result.output
    assert "status running at step 10 (ETA 01:02:05)" in result.stdout
    assert "status succeeded at step 40\n" in result.stdout
