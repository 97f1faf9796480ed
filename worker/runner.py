"""What the `jobs.train` task runs for one delivery of a job: claim it, then train it in this
process (one GPU) or in one process per rank (several). The steps themselves, and the outline
of a job's life on the worker, are in worker/attempt.py; the ranks in worker/ranks.py."""

from __future__ import annotations

import uuid
from functools import lru_cache

from app.config import get_settings
from app.log_format import log_scope
from app.models import JobStatus
from worker.attempt import AttemptRunner
from worker.ranks import run_ranks


class JobRunner(AttemptRunner):
    @log_scope()  # the claim binds the job's id and attempt to this delivery's log lines
    def run(self, job_id: uuid.UUID) -> str:
        """The delivery's outcome: skipped (no job of its queue can start), or how the attempt ended."""
        claimed = self.claim(job_id)  # this job, or another of its queue whose turn it is
        if claimed is None:
            return "skipped"
        job_id = claimed.job_id
        if claimed.cancel_requested:
            self.finish(job_id, claimed.attempt, status=JobStatus.cancelled)
            return "cancelled"
        if claimed.unusable is not None:  # e.g. its data set was deleted
            self.finish(job_id, claimed.attempt, status=JobStatus.failed, error=claimed.unusable)
            return "failed"
        if claimed.spec.resources.gpus > 1:
            return run_ranks(self, claimed)
        return self.train(claimed)


@lru_cache
def get_runner() -> JobRunner:
    return JobRunner(get_settings())
