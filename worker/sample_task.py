"""The `jobs.sample` task: draw images from a committed checkpoint for POST /v1/jobs/{id}/sample.

claim the request (queued -> running; a conditional update, so a re-delivered task does nothing)
  -> load the checkpoint's weights (S3: a local copy), draw with the asked sampler and seed
  -> write a PNG grid and an .npz of the images, store both, and finish the request with their
     keys and hashes; any failure finishes it failed, with a reason the user can act on.
The files go under the checkpoint root's sample-requests/ (outside any job's folder, which its
attempts tidy). torch is imported only inside draw_requested_samples, so the worker starts light.
"""

from __future__ import annotations

import io
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from sqlalchemy.orm import Session, sessionmaker

from app.checkpoints.repository import CheckpointRepository
from app.checkpoints.store import CheckpointStore, make_store
from app.config import Settings
from app.db import session_scope
from app.jobs.lifecycle import remove_prefix
from app.jobs.repository import JobRepository
from app.samples.repository import SampleRepository
from app.spec import JobSpec
from worker.attempt import describe_failure
from worker.capacity import worker_name

if TYPE_CHECKING:  # torch: the Celery worker and the sweeper start without it
    import torch

log = logging.getLogger(__name__)


class _StoredImages(NamedTuple):
    """A drawn request's files in the store: the request row's columns of the same names."""

    png_path: str
    png_sha256: str
    npz_path: str
    npz_sha256: str


def draw_requested_samples(settings: Settings, factory: sessionmaker[Session], request_id: uuid.UUID) -> str:
    """Run one sample request to its end; returns skipped (not queued), failed, deleted (its job was,
    meanwhile) or succeeded."""
    from worker.ddpm.checkpoint import load_unet
    from worker.ddpm.sampling import sample_images
    from worker.ddpm.trainer import resolve_device

    with session_scope(factory) as session:
        samples = SampleRepository(session)
        claimed = samples.claim(request_id, worker_name())
        if claimed is None:
            log.info("sample request %s is not queued: nothing to do for this delivery", request_id)
            return "skipped"
        job_id, step = claimed
        request = samples.get_request(request_id)
        checkpoint = CheckpointRepository(session).get(job_id, step)
        job = JobRepository(session).get(job_id)
        session.expunge_all()

    def finish(**values: object) -> bool:
        with session_scope(factory) as session:
            return SampleRepository(session).finish(request_id, **values)

    if checkpoint is None or job is None or request is None:
        finish(status="failed", error=f"the checkpoint at step {step} is gone (pruned by keep_checkpoints?)")
        return "failed"
    spec = JobSpec.model_validate(job.spec)
    store = make_store(settings)
    try:
        device = resolve_device(None if settings.device == "auto" else settings.device)
        with store.local_copy(checkpoint.path, checkpoint.sha256, checkpoint.size_bytes) as weights:
            unet = load_unet(weights, device)
        images = sample_images(
            unet,
            spec,
            request.count,
            request.seed,
            device,
            sampler=request.sampler,  # type: ignore[arg-type]
            steps=request.steps,
        )
        stored = _store_images(store, images, settings.checkpoint_root / "sample-requests" / str(request_id))
    except Exception as exc:
        log.exception("sample request %s failed", request_id)
        finish(status="failed", error=describe_failure(exc, spec))
        return "failed"
    if not finish(status="succeeded", **stored._asdict()):
        log.info("sample request %s: its job was deleted meanwhile; removing what it drew", request_id)
        remove_prefix(store, f"sample-requests/{request_id}/")
        return "deleted"
    store.discard_scratch(stored.png_path)
    store.discard_scratch(stored.npz_path)
    return "succeeded"


def _store_images(store: CheckpointStore, images: torch.Tensor, out_dir: Path) -> _StoredImages:
    """Write the grid and the .npz (N, H, W, C uint8) and store both."""
    import numpy as np

    from worker.ddpm.checkpoint import atomic_write
    from worker.ddpm.data import to_uint8
    from worker.ddpm.sampling import save_grid_png

    out_dir.mkdir(parents=True, exist_ok=True)
    png_sha = save_grid_png(images, out_dir / "grid.png")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy())  # (N, H, W, C)
    npz_sha = atomic_write(out_dir / "images.npz", buffer.getvalue())
    png_key, npz_key = store.publish(out_dir / "grid.png", png_sha), store.publish(out_dir / "images.npz", npz_sha)
    return _StoredImages(png_key, png_sha, npz_key, npz_sha)
