"""The lease's fenced write against the real PostgreSQL: one write per attempt, none once fenced."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app.db import session_scope
from app.jobs.repository import JobRepository
from app.jobs.service import requeue_expired
from app.models import Job, utcnow
from tests.worker.test_runner import TINY, submit
from worker.ddpm.sink import StopReason, StopTraining
from worker.lease import Lease


def claimed_lease(factory) -> Lease:
    job_id = submit(factory, TINY)
    with session_scope(factory) as s:
        attempt = JobRepository(s).claim(job_id, "test-worker")
    assert attempt == 1
    return Lease(job_id, attempt, timeout_s=60)


class TestFencedWrite:
    def test_the_current_attempt_writes_and_stamps_a_heartbeat(self, factory) -> None:
        lease = claimed_lease(factory)
        before = utcnow()
        with session_scope(factory) as s:
            assert lease.write(s, step=7) is True
        with session_scope(factory) as s:
            job = s.get(Job, lease.job_id)
            assert (job.step, job.heartbeat_at >= before) == (7, True)
        assert lease.fenced is False

    def test_a_fenced_off_attempt_writes_nothing_and_stops(self, factory) -> None:
        lease = claimed_lease(factory)
        with session_scope(factory) as s:  # the sweeper: the lease expired, the job is queued again
            assert requeue_expired(s, utcnow() + timedelta(hours=1)) == [lease.job_id]
        with session_scope(factory) as s:
            assert lease.write(s, step=7) is False
        assert lease.fenced is True
        with pytest.raises(StopTraining) as stopped, session_scope(factory) as s:
            lease.write_or_stop(s, step=8)
        assert stopped.value.reason is StopReason.fenced
        with pytest.raises(StopTraining) as checked:
            lease.check()
        assert checked.value.reason is StopReason.fenced
        with session_scope(factory) as s:
            job = s.get(Job, lease.job_id)
            assert (job.status, job.step) == ("queued", 0)


class TestCheck:
    def test_an_unrenewed_lease_stops_before_it_expires(self, factory) -> None:
        lease = claimed_lease(factory)
        lease.check()  # just claimed
        lease.renewed_at -= 0.81 * lease.timeout_s
        with pytest.raises(StopTraining) as stopped:
            lease.check()
        assert stopped.value.reason is StopReason.lease_lost
