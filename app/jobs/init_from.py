"""A fine-tune's source, checked at submit (`training.init_from`).

The source must be a job the submitter owns (an admin included: another user's job does not exist
for this purpose, as for data sets), not deleted, with a checkpoint row that `checkpoint` names
(a step, `latest`, `best`), whose network the new spec's would load (app/model_shape.py). The
step it resolves to is stored in the spec (`init_from.step`), so the worker fetches exactly that
checkpoint, however the source goes on. Each refusal is a 422 whose `loc` names the field.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from app.checkpoints.repository import CheckpointRepository
from app.jobs.limits import SpecRefused
from app.jobs.repository import JobRepository
from app.model_shape import shape_differences
from app.models import Job, User
from app.spec import InitFromSpec, JobSpec

LOC = ("body", "training", "init_from")
SHOWN_STEPS = 10  # the newest checkpoint steps an error lists


def with_init_from(session: Session, spec: JobSpec, owner: User) -> JobSpec:
    """The spec with `init_from.step` resolved; unchanged when it is not a fine-tune. SpecRefused
    naming init_from.job (not one of the owner's jobs), init_from.checkpoint (no such checkpoint)
    or init_from itself (the source's weights would not load into this model)."""
    init = spec.training.init_from
    if init is None:
        return spec
    source = _source_job(session, init, owner)
    errors = []
    row = CheckpointRepository(session).find(source.id, init.checkpoint)
    if row is None:
        errors.append(_error("checkpoint", _no_checkpoint(session, source.id, init.checkpoint), init.checkpoint))
    differences = shape_differences(JobSpec.model_validate(source.spec), spec)
    if differences:
        msg = (
            f"job {source.id}'s weights do not fit this model: {'; '.join(differences)}. Use the same "
            "model and dataset.channels as that job (dataset.image_size may differ if the same levels have attention)"
        )
        errors.append(_error(None, msg, init.model_dump(mode="json")))
    if errors:
        raise SpecRefused(errors)
    assert row is not None
    filled = init.model_copy(update={"step": row.step})
    return spec.model_copy(update={"training": spec.training.model_copy(update={"init_from": filled})})


def _source_job(session: Session, init: InitFromSpec, owner: User) -> Job:
    """The owner's own job; one of another user's, a deleted one and none at all read the same."""
    job_id = uuid.UUID(init.job)
    source = JobRepository(session).get(job_id, owner_id=owner.id)
    if source is None or source.deleted_at is not None:
        msg = f"job {job_id} not found: use the id of one of your jobs (GET /v1/jobs)"
        raise SpecRefused([_error("job", msg, init.job)])
    return source


def _no_checkpoint(session: Session, job_id: uuid.UUID, checkpoint: int | str) -> str:
    steps = [row.step for row in CheckpointRepository(session).list(job_id)]
    if not steps:
        return f"job {job_id} has no checkpoint yet: wait until it saves one (training.checkpoint_every)"
    kept = ", ".join(map(str, steps[-SHOWN_STEPS:]))
    if checkpoint == "best":
        return (
            f"job {job_id} has no evaluated checkpoint (`best` needs a kept checkpoint with an FID: "
            f"evaluation.every > 0 and training.keep_best); its checkpoints are at steps {kept}"
        )
    return f"job {job_id} has no checkpoint at step {checkpoint}; its checkpoints are at steps {kept}"


def _error(field: str | None, msg: str, value: Any) -> dict[str, Any]:
    loc = [*LOC, field] if field else list(LOC)
    return {"type": "value_error", "loc": loc, "msg": msg, "input": value}
