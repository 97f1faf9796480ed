"""GET /v1/jobs/{id}/logs: the worker's lines of each attempt, paged, the owner's only."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import Job, JobLogLine
from tests.conftest import MakeUser


@pytest.fixture
def job_id(client: TestClient, clean_db: Settings) -> str:
    """A job in its second attempt: three lines of the first, two of the second."""
    job_id = client.post("/v1/jobs", json={}).json()["id"]
    at = datetime(2026, 1, 1, tzinfo=UTC)
    with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(status="running", attempt=2))
        for attempt, seq, level, message in [
            (1, 0, "INFO", "starting"),
            (1, 1, "ERROR", "failed\nTraceback (most recent call last):\n  ..."),
            (1, 2, "INFO", "ended"),
            (2, 0, "INFO", "resumed"),
            (2, 1, "WARNING", "slow"),
        ]:
            s.add(JobLogLine(job_id=uuid.UUID(job_id), attempt=attempt, seq=seq, at=at, level=level,
                             logger="worker.attempt", message=message))  # fmt: skip
    return job_id


def messages(page: dict) -> list[tuple[int, int, str]]:
    return [(line["attempt"], line["seq"], line["message"].split("\n")[0]) for line in page["items"]]


class TestLogs:
    def test_pages_run_through_every_attempt_in_order(self, client: TestClient, job_id: str) -> None:
        url = f"/v1/jobs/{job_id}/logs"
        pages, params = [], {"limit": 2}
        while True:
            r = client.get(url, params=params)
            assert r.status_code == 200, r.text
            pages.append(r.json())
            if r.json()["next_cursor"] is None:
                break
            params["cursor"] = r.json()["next_cursor"]
        assert [messages(p) for p in pages] == [
            [(1, 0, "starting"), (1, 1, "failed")],
            [(1, 2, "ended"), (2, 0, "resumed")],
            [(2, 1, "slow")],
        ]
        whole = client.get(url).json()
        assert whole["next_cursor"] is None and len(whole["items"]) == 5
        assert whole["items"][1] == {
            "attempt": 1,
            "seq": 1,
            "at": "2026-01-01T00:00:00Z",
            "level": "ERROR",
            "logger": "worker.attempt",
            "message": "failed\nTraceback (most recent call last):\n  ...",
        }
        assert messages(client.get(url, params={"attempt": 2}).json()) == [(2, 0, "resumed"), (2, 1, "slow")]
        one = client.get(url, params={"attempt": 1, "limit": 1}).json()
        rest = client.get(url, params={"attempt": 1, "cursor": one["next_cursor"]}).json()
        assert messages(one) + messages(rest) == [(1, 0, "starting"), (1, 1, "failed"), (1, 2, "ended")]

    @pytest.mark.parametrize(
        ("params", "loc"),
        [
            ({"attempt": 0}, ["query", "attempt"]),
            ({"attempt": "one"}, ["query", "attempt"]),
            ({"attempt": 3}, ["query", "attempt"]),  # the job has had two
            ({"cursor": "abc"}, ["query", "cursor"]),
            ({"cursor": "01.2"}, ["query", "cursor"]),
            ({"cursor": "1.2.3"}, ["query", "cursor"]),
            ({"cursor": "9999999999.0"}, ["query", "cursor"]),
            ({"limit": 0}, ["query", "limit"]),
        ],
    )
    def test_a_bad_attempt_cursor_or_limit_is_422_naming_it(
        self, client: TestClient, job_id: str, params: dict, loc: list[str]
    ) -> None:
        r = client.get(f"/v1/jobs/{job_id}/logs", params=params)
        assert r.status_code == 422, r.text
        assert [e["loc"] for e in r.json()["detail"]] == [loc]

    def test_another_users_job_is_404_like_no_job(self, job_id: str, clean_db: Settings, make_user: MakeUser) -> None:
        bob = make_user("bob")
        with TestClient(create_app(clean_db), headers=bob.headers) as c:
            theirs = c.get(f"/v1/jobs/{job_id}/logs")
            nobody = c.get(f"/v1/jobs/{uuid.uuid4()}/logs")
        assert (theirs.status_code, nobody.status_code) == (404, 404)
        assert "starting" not in theirs.text
