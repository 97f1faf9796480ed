"""A multi-GPU attempt: one spawned process per rank, supervised by the worker that claimed it.

Rank 0 runs the attempt as a single-GPU worker does (worker/attempt.py: lease, heartbeat, every
database write); the other ranks only train, following rank 0's collectives
(worker/ddpm/distributed.py). The supervising worker process trains nothing: it passes a
shutdown on to rank 0, and when a rank dies (killed, crashed) it takes the others down and
releases the attempt at once, as the sweeper would once the lease expired. torch is imported
only inside these functions, so the Celery worker starts without it.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from multiprocessing.synchronize import Event

from app.config import Settings
from app.db import session_scope
from app.jobs.repository import JobRepository
from app.log_format import configure_logging
from app.models import JobStatus
from worker.attempt import AttemptRunner, ClaimedAttempt
from worker.ddpm.sink import NullSink
from worker.shutdown import request_shutdown, shutdown_requested, stop_consuming

log = logging.getLogger(__name__)

# How long a rank waits in a collective before it gives up on its peers. The other ranks wait there
# while rank 0 writes a checkpoint, uploads it (S3) or draws a sample grid, which can take minutes
# for a large network; a rank that dies is noticed at once by the supervising worker instead.
COLLECTIVE_TIMEOUT_S = 1800.0


def run_ranks(runner: AttemptRunner, claimed: ClaimedAttempt) -> str:
    """Train on `resources.gpus` processes and watch them. A rank that dies takes the others
    down, and the attempt is lost like a dead worker's: the job goes back to the queue and
    resumes from its latest checkpoint."""
    from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

    from worker.ddpm.distributed import free_port, spawn_ranks

    job_id, attempt, spec = claimed.job_id, claimed.attempt, claimed.spec
    world_size = spec.resources.gpus
    shutdown = multiprocessing.get_context("spawn").Event()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    args = (runner.settings, claimed, world_size, init_method, shutdown)
    ranks = spawn_ranks(_rank_main, args, world_size)
    log.info("job %s: attempt %d runs on %d ranks, pids %s", job_id, attempt, world_size, ranks.pids())
    rank0_done_at: float | None = None
    try:
        while not ranks.join(timeout=1.0, grace_period=10.0):
            if shutdown_requested() and not shutdown.is_set():
                stop_consuming()  # before rank 0 re-queues the job: this worker must not take it back
                shutdown.set()  # rank 0 checkpoints at its next log point and re-queues the job
            if ranks.processes[0].exitcode is not None:
                # Rank 0 has ended the attempt; the others leave with it (a hung collective
                # must not hold the GPUs).
                rank0_done_at = rank0_done_at or time.monotonic()
                if time.monotonic() - rank0_done_at > 30:
                    for process in ranks.processes[1:]:
                        process.kill()
    except ProcessException as exc:
        what = str(exc).strip().splitlines()[-1]  # "terminated with signal SIGKILL", or the error
        if isinstance(exc, ProcessExitedException):
            what = what.removeprefix(f"process {exc.error_index} ")
        return runner.release_lost(job_id, attempt, spec, f"rank {exc.error_index} (pid {exc.error_pid}) {what}")

    def read_status() -> str:
        with session_scope(runner.sessionmaker) as session:
            job = JobRepository(session).get(job_id)
            return job.status if job is not None else "missing"

    outcome = runner.retry_db(read_status)
    if outcome == JobStatus.running:  # rank 0 stopped without an ending (lost its lease)
        return runner.release_lost(job_id, attempt, spec, "rank 0 stopped without finishing the attempt")
    return str(outcome)


def _rank_main(
    rank: int, settings: Settings, claimed: ClaimedAttempt, world_size: int, init_method: str, shutdown: Event
) -> None:
    """One rank of a multi-GPU attempt, in its own (spawned) process; `shutdown` is set when the
    supervising worker is shutting down."""
    import signal

    from worker.ddpm.distributed import Ranks, process_group
    from worker.ddpm.trainer import resolve_device, train

    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s: %(levelname)s/rank-{rank}] %(name)s: %(message)s")
    configure_logging(settings)  # DDPM_LOG_FORMAT=json: JSON lines instead
    # SIGTERM to the whole process group (a terminal, a test harness) means the same as to the
    # worker: rank 0 checkpoints and re-queues at its next log point, and the others follow it.
    signal.signal(signal.SIGTERM, lambda *_: request_shutdown() if rank == 0 else None)
    runner = AttemptRunner(settings)
    ranks = Ranks(rank, world_size)
    device_type = resolve_device(runner.device()).type
    with process_group(ranks, device_type, init_method, timeout_s=COLLECTIVE_TIMEOUT_S):
        if ranks.is_main:
            threading.Thread(target=lambda: shutdown.wait() and request_shutdown(), daemon=True).start()
            runner.train(claimed, ranks)
        else:
            spec = runner.resolved_dataset(claimed.spec)
            job_dir, device = runner.job_dir(claimed.job_id, claimed.attempt), runner.device(ranks)
            train(
                spec,
                job_dir,
                NullSink(),
                resume_from=claimed.resume_from,
                init_from=claimed.init_from,
                device=device,
                ranks=ranks,
                images_file=claimed.images,
            )
