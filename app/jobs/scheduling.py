"""Who starts next: priorities, a per-user cap on running GPUs, and users taking turns, on the
Celery queues and the database's claim (no second scheduler).

Every queued job still has one `jobs.train` message on its queue, but a delivery is a *turn* of
that queue, not a promise of that job: the worker claims the queue's next job in the claim
order (`JobRepository.claim_next`): higher `resources.priority` first; then the user with the
fewest GPUs running; then the user whose latest start is oldest (so one user's ten jobs do not
hold back another's first); then the delivered job before its owner's others; then the oldest.
A job whose owner would hold more than DDPM_MAX_RUNNING_GPUS_PER_USER GPUs is passed over.

Messages stay about as many as queued jobs: a turn that claims another job leaves that job's
message for a later turn. A turn that claims nothing (every waiting job is over its owner's cap)
marks its job `dispatched_at = None`, as a job with no message; when a job leaves `running`, the
worker sends one turn for the first such job that could start now (`send_next_turn`), and the
sweeper sends such jobs at its next pass if that send was lost (`queued_needing_dispatch` skips
the ones still over the cap, so a capped job is not sent round and round).
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.jobs.repository import JobRepository, OwnerLoad, WaitingJob
from app.models import Job, JobStatus
from app.queue import Sender, Task, send_after_commit
from app.spec import JobSpec

log = logging.getLogger(__name__)


def claim_turn(session: Session, hint: uuid.UUID, worker: str, cap: int) -> tuple[uuid.UUID, int] | None:
    """A delivery of `hint`'s message: claim its queue's next job; (job id, attempt) or None.

    A job stored before 0012 (no queue) is claimed alone, as its delivery always did."""
    repo = JobRepository(session)
    queue = session.scalar(select(Job.queue).where(Job.id == hint, Job.deleted_at.is_(None)))
    if queue is None:
        attempt = repo.claim(hint, worker)
        return (hint, attempt) if attempt is not None else None
    taken = repo.claim_next(queue, worker, hint=hint, cap=cap)
    if taken is None:
        # Its message is spent and nothing could start: it waits without one, until a job of
        # its queue ends (send_next_turn) or the sweeper sends it.
        session.execute(update(Job).where(Job.id == hint, Job.status == JobStatus.queued).values(dispatched_at=None))
    elif taken[0] != hint:
        log.info("job %s: the delivery of job %s was %s's turn", taken[0], hint, queue)
    return taken


def send_next_turn(session: Session, sender: Sender, ended: uuid.UUID, cap: int) -> None:
    """`ended` left `running` in this transaction: once it commits, send a turn of its queue for
    the first waiting job there that has no message and can now start (its owner's earlier job
    ended, say). Nothing when every such job already has its message."""
    queue = session.scalar(select(Job.queue).where(Job.id == ended))
    if queue is None:
        return
    waiting = JobRepository(session).next_waiting(queue, cap)
    if waiting is not None:
        send_after_commit(session, sender, Task.train(waiting, queue))


@dataclass
class Places:
    """What the queue says of a page's queued jobs: their owners' running GPUs, and how many jobs
    are ahead of each one that could start (two queries, only when the page has queued jobs)."""

    cap: int
    running: dict[uuid.UUID, int] = field(default_factory=dict)
    ahead: dict[uuid.UUID, int] = field(default_factory=dict)

    @classmethod
    def of(cls, session: Session, jobs: list[Job], cap: int) -> Places:
        queued = [job for job in jobs if job.status == JobStatus.queued]
        if not queued:
            return cls(cap)
        repo = JobRepository(session)
        running = repo.running_gpus(sorted({job.owner_id for job in queued})) if cap > 0 else {}
        ahead: dict[uuid.UUID, int] = {}
        for queue in sorted({job.queue for job in queued if job.queue is not None}):
            ahead |= places_in_line(*repo.waiting_in(queue), cap)
        return cls(cap, running, ahead)

    def over_cap(self, job: Job) -> str | None:
        """Why the job cannot start while its owner's running jobs hold their GPUs; None if it can."""
        held = self.running.get(job.owner_id, 0)
        if self.cap <= 0 or held + JobSpec.model_validate(job.spec).resources.gpus <= self.cap:
            return None
        return (
            f"you have {held} GPU{'s' if held != 1 else ''} in running jobs, the most "
            f"DDPM_MAX_RUNNING_GPUS_PER_USER={self.cap} allows: it starts when one of them ends"
        )

    def jobs_ahead(self, job: Job) -> int:
        return self.ahead.get(job.id, 0)


def places_in_line(waiting: list[WaitingJob], loads: dict[uuid.UUID, OwnerLoad], cap: int) -> dict[uuid.UUID, int]:
    """How many starts come before each waiting job of one queue if they start one by one and
    none ends meanwhile: the claim order applied again after each start, as the claims do (so
    with one user's ten jobs and another's one, the other's is second, not eleventh). A job
    that can start only once one of its owner's jobs ends is behind every job that can start."""
    lines: dict[uuid.UUID, deque[WaitingJob]] = {}
    for job in sorted(waiting, key=lambda j: (-j.priority, j.created_at, j.id)):
        lines.setdefault(job.owner_id, deque()).append(job)
    # Per owner: GPUs and jobs running, then their latest start (never < a real one < one here).
    state = {
        owner: [load.gpus, load.jobs, (0,) if load.latest_start is None else (1, load.latest_start)]
        for owner in lines
        for load in [loads.get(owner, OwnerLoad(0, 0, None))]
    }
    places: dict[uuid.UUID, int] = {}
    while heads := [
        (-line[0].priority, *state[owner], line[0].created_at, line[0].id, owner)
        for owner, line in lines.items()
        if line and (cap <= 0 or state[owner][0] + line[0].gpus <= cap)
    ]:
        owner = min(heads)[-1]
        job = lines[owner].popleft()
        places[job.id] = len(places)
        state[owner] = [state[owner][0] + job.gpus, state[owner][1] + 1, (2, len(places))]
    started = len(places)
    places |= {job.id: started for line in lines.values() for job in line}
    return places


def ahead_reason(count: int) -> str:
    return f"{count} job{'s' if count != 1 else ''} ahead of it (higher priority, or other users' turn)"
