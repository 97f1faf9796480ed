"""Fair scheduling with real processes: two Celery CPU workers, three users, a per-user cap of one
running job (DDPM_MAX_RUNNING_GPUS_PER_USER=1). Every job is queued before the workers start;
the starts they record must each be a pick the claim order allows (app/jobs/scheduling.py):
priority first, then the user with the fewest running jobs, then the one whose latest start is
oldest, never a user over the cap. Which worker takes which message is Celery's business, so the
test checks every start against the rules rather than one fixed sequence, and prints the order."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import Job, User
from tests.conftest import MakeUser
from tests.e2e.conftest import process, wait_for_status, worker_argv

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CAP = 1
# A finish and a claim on the other worker this close together may have missed each other.
RACE = timedelta(seconds=0.5)
# (name, owner, priority), in the order they are submitted.
JOBS = [
    ("a1", "alice", "normal"),
    ("a2", "alice", "normal"),
    ("a3", "alice", "normal"),
    ("b1", "bob", "normal"),
    ("b2", "bob", "low"),
    ("c1", "carol", "high"),
]
RANK = {"low": -1, "normal": 0, "high": 1}


def spec(name: str, priority: str) -> dict:
    return {
        "name": name,
        "dataset": {"image_size": 8},
        "model": {"preset": "custom", "channels": [16, 32], "norm_groups": 8},
        "diffusion": {"timesteps": 50},
        "training": {"steps": 60, "batch_size": 16, "log_every": 20, "checkpoint_every": 60, "sample_every": 0},
        "resources": {"priority": priority},
    }


@dataclass(frozen=True)
class Run:
    name: str
    owner: str
    priority: int
    worker: str
    start: datetime
    end: datetime


def legal(pick: Run, runs: list[Run], ambiguous_running: bool) -> bool:
    """Was `pick` the claim order's choice (up to ties between users) when it started?"""
    at = pick.start
    running: dict[str, int] = {}
    latest: dict[str, datetime] = {}
    for run in runs:
        if run.start < at:
            latest[run.owner] = max(latest.get(run.owner, run.start), run.start)
            if run.end > at or (ambiguous_running and run.end > at - RACE):
                running[run.owner] = running.get(run.owner, 0) + 1
    waiting = [run for run in runs if run.start >= at and running.get(run.owner, 0) + 1 <= CAP]

    def key(run: Run) -> tuple:
        last = latest.get(run.owner)
        return (-run.priority, running.get(run.owner, 0), last is not None, last or at)

    return pick in waiting and key(pick) == min(key(run) for run in waiting)


def recorded_runs(settings: Settings) -> list[Run]:
    with session_scope(make_sessionmaker(make_engine(settings))) as s:
        rows = s.execute(select(Job, User.name).join(User, User.id == Job.owner_id)).all()
        assert all(job.attempt == 1 and job.status == "succeeded" for job, _ in rows)
        runs = [Run(j.name, owner, j.priority, j.worker, j.started_at, j.finished_at) for j, owner in rows]
    return sorted(runs, key=lambda run: run.start)


def test_two_workers_three_users_start_in_the_claim_order(
    clean_db: Settings, settings_env: dict[str, str], tmp_path: Path, make_user: MakeUser
) -> None:
    settings = clean_db.model_copy(update={"max_running_gpus_per_user": CAP})
    env = settings_env | {
        "DDPM_MAX_RUNNING_GPUS_PER_USER": str(CAP),
        "DDPM_WORKER_GPU_MEMORY_GB": "8",
        "OMP_NUM_THREADS": "1",
    }
    users = {name: make_user(name) for name in ("alice", "bob", "carol")}
    with TestClient(create_app(settings)) as client:
        ids = {}
        for name, owner, priority in JOBS:
            r = client.post("/v1/jobs", json=spec(name, priority), headers=users[owner].headers)
            assert r.status_code == 201, r.text
            ids[name] = (r.json()["id"], users[owner].headers)
        logs = [tmp_path / "worker-1.log", tmp_path / "worker-2.log"]
        began = time.monotonic()
        with process(worker_argv(), env, logs[0]), process(worker_argv(), env, logs[1]):
            for job_id, headers in ids.values():
                client.headers.update(headers)
                wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=300, logs=logs)
        took = time.monotonic() - began

    runs = recorded_runs(clean_db)
    t0 = runs[0].start
    print(f"\nstart order (cap {CAP} running job per user, 2 CPU workers, {took:.0f} s in all):")
    for run in runs:
        rel = (run.start - t0).total_seconds(), (run.end - t0).total_seconds()
        print(f"  {run.name:3} {run.owner:6} priority {run.priority:+d}  {rel[0]:6.2f}-{rel[1]:6.2f} s  {run.worker}")
    assert runs[0].name == "c1", "the one high-priority job starts first"
    for owner in users:  # the cap: a user's jobs never overlap
        mine = [run for run in runs if run.owner == owner]
        assert all(earlier.end <= later.start for earlier, later in pairwise(mine)), mine
    illegal = [run.name for run in runs if not (legal(run, runs, False) or legal(run, runs, True))]
    assert illegal == [], f"started out of the claim order: {illegal}"
