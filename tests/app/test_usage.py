"""GET /v1/usage and the job's gpu_seconds / eta_seconds, from job_attempts rows written here
with chosen times (the worker's side, which writes them, is tests/worker/test_attempt_usage.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import Job, JobAttempt, utcnow
from tests.conftest import ApiUser, MakeUser

T = datetime(2026, 1, 1, tzinfo=UTC)


def at(hours: float) -> datetime:
    return T + timedelta(hours=hours)


class Usage:
    """Alice, bob and an admin; jobs of alice's and bob's; attempts added with `attempt(...)`."""

    def __init__(self, settings: Settings, make_user: MakeUser) -> None:
        self.alice, self.bob, self.admin = make_user("alice"), make_user("bob"), make_user("root", admin=True)
        self.app = create_app(settings)
        self.factory = make_sessionmaker(make_engine(settings))

    def job(self, who: ApiUser, **values: object) -> str:
        with TestClient(self.app, headers=who.headers) as c:
            job_id = c.post("/v1/jobs", json={}).json()["id"]
        if values:
            with session_scope(self.factory) as s:
                s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(**values))
        return job_id

    def attempt(self, who: ApiUser, job_id: str | None, n: int, gpus: int, start: datetime, **times: datetime) -> None:
        end = times.get("ended_at")
        with session_scope(self.factory) as s:
            s.add(
                JobAttempt(
                    job_id=uuid.UUID(job_id) if job_id else None,
                    owner_id=who.user.id,
                    attempt=n,
                    worker="host:1",
                    device="cpu",
                    gpus=gpus,
                    started_at=start,
                    seen_at=times.get("seen_at", end or start),
                    ended_at=end,
                    outcome="succeeded" if end else None,
                )
            )

    def get(self, who: ApiUser, path: str, **params: str) -> dict:
        with TestClient(self.app, headers=who.headers) as c:
            r = c.get(path, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    def refusal(self, **params: str) -> tuple[int, list[object]]:
        with TestClient(self.app, headers=self.alice.headers) as c:
            r = c.get("/v1/usage", params=params)
        return r.status_code, [e["loc"] for e in r.json()["detail"]]


@pytest.fixture
def world(clean_db: Settings, make_user: MakeUser) -> Usage:
    return Usage(clean_db, make_user)


def rows(answer: dict) -> list[tuple[str, float, int, int]]:
    return [(u["user"], u["gpu_seconds"], u["attempts"], u["jobs"]) for u in answer["items"]]


class TestUsage:
    def test_gpu_seconds_are_gpus_times_the_part_of_each_attempt_in_the_window(self, world: Usage) -> None:
        a, b = world.job(world.alice), world.job(world.bob)
        world.attempt(world.alice, a, 1, 2, at(10), ended_at=at(11))  # 10:30-11:00 inside: 2 x 1800
        world.attempt(world.alice, a, 2, 2, at(12), seen_at=at(12.5))  # running: 12:00-12:15 inside: 2 x 900
        world.attempt(world.alice, None, 1, 4, at(10.5), ended_at=at(10.75))  # a deleted job's: 4 x 900
        deleting = world.job(world.alice, status="succeeded", deleted_at=at(20))  # gone, its rows not yet
        world.attempt(world.alice, deleting, 1, 1, at(11), ended_at=at(11.25))  # 900, not in `jobs`
        world.attempt(world.alice, a, 3, 2, at(8), ended_at=at(9))  # over before the window
        world.attempt(world.alice, a, 4, 2, at(12.25), seen_at=at(13))  # starts at `until`
        world.attempt(world.bob, b, 1, 1, at(9), ended_at=at(13))  # 10:30-12:15: 6300
        window = {"since": "2026-01-01T10:30:00Z", "until": "2026-01-01T12:15:00+00:00"}

        answer = world.get(world.admin, "/v1/usage", **window)
        assert (answer["since"], answer["until"]) == ("2026-01-01T10:30:00Z", "2026-01-01T12:15:00Z")
        assert rows(answer) == [("alice", 9900.0, 4, 1), ("bob", 6300.0, 1, 1), ("root", 0.0, 0, 0)]
        # A user sees themself only; another offset names the same instant; no offset is UTC.
        assert rows(world.get(world.alice, "/v1/usage", **window)) == [("alice", 9900.0, 4, 1)]
        shifted = {"since": "2026-01-01T11:30:00+01:00", "until": "2026-01-01T12:15:00"}
        assert rows(world.get(world.bob, "/v1/usage", **shifted)) == [("bob", 6300.0, 1, 1)]
        assert world.get(world.bob, "/v1/usage", **shifted)["items"][0]["user_id"] == str(world.bob.user.id)

    def test_the_default_window_is_the_last_30_days(self, world: Usage) -> None:
        now = utcnow()
        world.attempt(
            world.alice, world.job(world.alice), 1, 1, now - timedelta(days=40), ended_at=now - timedelta(days=29)
        )
        answer = world.get(world.alice, "/v1/usage")
        since, until = (datetime.fromisoformat(answer[k]) for k in ("since", "until"))
        assert until - since == timedelta(days=30) and abs((until - now).total_seconds()) < 60
        [(_, seconds, attempts, jobs)] = rows(answer)
        assert (attempts, jobs) == (1, 1) and 86400 - 60 < seconds <= 86400

    @pytest.mark.parametrize(
        ("params", "loc"),
        [
            ({"since": "last tuesday"}, ["query", "since"]),
            ({"since": "1700000000"}, ["query", "since"]),  # not read as Unix seconds
            ({"until": "2026-13-01T00:00:00Z"}, ["query", "until"]),
            ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, ["query", "since"]),
            ({"since": "2026-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, ["query", "since"]),
            ({"since": "0001-01-01T00:00:00+05:00"}, ["query", "since"]),  # before year 1 in UTC
            ({"until": "9999-12-31T23:00:00-05:00"}, ["query", "until"]),  # after year 9999 in UTC
            ({"until": "0001-01-02T00:00:00Z"}, ["query", "until"]),  # no room for the default since
        ],
    )
    def test_a_window_it_cannot_use_is_a_422_naming_the_field(self, world: Usage, params: dict, loc: list) -> None:
        assert world.refusal(**params) == (422, [loc])


class TestJobFigures:
    def test_a_job_shows_its_gpu_seconds_and_while_running_its_eta(self, world: Usage) -> None:
        running = world.job(world.alice, status="running", step=10, total_steps=40, steps_per_s=2.0, attempt=2)
        done = world.job(world.alice, status="succeeded", step=40, total_steps=40, steps_per_s=2.0, attempt=1)
        queued = world.job(world.alice)
        world.attempt(world.alice, running, 1, 2, at(0), ended_at=at(1))  # 7200
        world.attempt(world.alice, running, 2, 2, at(2), seen_at=at(2.25))  # 1800 so far
        world.attempt(world.alice, done, 1, 1, at(0), ended_at=at(0.5))
        shown = {j["id"]: (j["gpu_seconds"], j["eta_seconds"]) for j in world.get(world.alice, "/v1/jobs")["items"]}
        # ETA: (40 - 10) steps at 2 steps/s.
        assert shown == {running: (9000.0, 15.0), done: (1800.0, None), queued: (0.0, None)}
        one = world.get(world.alice, f"/v1/jobs/{running}")
        assert (one["gpu_seconds"], one["eta_seconds"]) == (9000.0, 15.0)
        # Nothing measured yet (a new attempt clears the rate): no ETA.
        with session_scope(world.factory) as s:
            s.execute(update(Job).where(Job.id == uuid.UUID(running)).values(steps_per_s=None))
        assert world.get(world.alice, f"/v1/jobs/{running}")["eta_seconds"] is None
