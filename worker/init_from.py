"""A fine-tune's source checkpoint, as the claim finds it (`training.init_from`).

The API resolved the source checkpoint's step at submit (`init_from.step`, app/jobs/init_from.py).
A fine-tune's first attempt (the job has no checkpoint of its own yet) looks that checkpoint's row
up in the claim's transaction and, once the claim commits, fetches its training state
(``.state.safetensors``: the raw weights and the EMA; the served file holds only the EMA). The
trainer starts from it at step 0 (worker/ddpm/state.py `LiveState.start_from`). Any later attempt
resumes from the job's own checkpoints and never reads the source again.

The source may be gone by then (deleted, or the checkpoint rotated out by keep_checkpoints as the
source went on training): the attempt is unusable and the job fails, saying so.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from app.checkpoints.repository import CheckpointRepository
from app.checkpoints.store import CheckpointFileError, CheckpointStore
from app.jobs.repository import JobRepository
from app.spec import JobSpec


@dataclass(frozen=True)
class SourceCheckpoint:
    """The checkpoint a fine-tune starts from, as its row says at claim."""

    job_id: uuid.UUID
    step: int
    state_key: str

    @classmethod
    def of(cls, session: Session, spec: JobSpec) -> SourceCheckpoint | str | None:
        """The source checkpoint; a reason the job cannot start from it; None when not a fine-tune."""
        init = spec.training.init_from
        if init is None:
            return None
        source_id = uuid.UUID(init.job)
        if init.step is None:
            return f"training.init_from: the step of job {source_id}'s checkpoint was never resolved; submit it again"
        source = JobRepository(session).get(source_id)
        if source is None or source.deleted_at is not None:
            return f"training.init_from: job {source_id} was deleted before this job started; its weights are gone"
        row = CheckpointRepository(session).get(source_id, init.step)
        if row is None:
            return (
                f"training.init_from: job {source_id} no longer has its checkpoint at step {init.step} (replaced by "
                "newer ones: training.keep_checkpoints); submit again naming a checkpoint it keeps"
            )
        return cls(source_id, init.step, row.state_path)

    def fetch(self, store: CheckpointStore) -> Path | str:
        """The training state on this host (S3: downloaded and checked), or why it cannot be read.
        StorageUnavailable propagates: the claim's lease runs out and a new attempt tries again."""
        try:
            path = store.resume_copy(self.state_key)
        except CheckpointFileError as exc:
            return f"training.init_from: job {self.job_id}'s checkpoint at step {self.step} cannot be read: {exc}"
        if not path.is_file():
            return f"training.init_from: job {self.job_id}'s checkpoint at step {self.step} is missing from storage"
        return path
