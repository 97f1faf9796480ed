"""The `datasets.prepare` task: turn an uploaded archive or a source URI into a prepared data set.

claim the row (preparing, with this worker's name; a re-delivery after it is ready does nothing)
  -> the members: the upload's local copy (S3: downloaded into the root), or the source's files
     fetched into a scratch folder
  -> prepare() writes datasets/<id>/images.tar and preview.png, both published to the store
  -> one update finishes the row ready, with counts, hashes and the summary; then the upload goes
Any failure finishes it failed with a reason a person can act on, and removes what it wrote. A
worker killed mid-way leaves the row `preparing` under its name: the sweeper frees it once the
worker stops checking in, and the next delivery prepares it again from the start (same input,
same deterministic tar, same keys).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from app.checkpoints.store import CheckpointFileError, CheckpointStore, StorageUnavailable, make_store
from app.config import Settings
from app.datasets.keys import dataset_prefix, prepared_key, preview_key
from app.datasets.repository import DatasetRepository
from app.db import session_scope
from app.files import sha256_file
from worker.capacity import worker_name
from worker.datasets import Limits, Member, PreparationFailed, Skipped
from worker.datasets.archive import archive_members
from worker.datasets.prepare import Prepared, prepare
from worker.datasets.sources import source_members

log = logging.getLogger(__name__)
SCRATCH = "datasets/.scratch"  # under the checkpoint root: sources' downloads, per preparation


@dataclass(frozen=True)
class _Claim:
    """What the task needs of the claimed row (read inside the claim's session)."""

    dataset_id: uuid.UUID
    worker: str
    source: str
    split: str | None
    archive_key: str | None
    archive_sha256: str | None


def prepare_dataset(settings: Settings, factory: sessionmaker[Session], dataset_id: uuid.UUID) -> str:
    """Prepare one data set to its end; returns skipped (not preparing), failed or ready."""
    name = worker_name()
    with session_scope(factory) as session:
        row = DatasetRepository(session).claim_preparation(dataset_id, name)
        if row is None:
            log.info("data set %s is not preparing: nothing to do for this delivery", dataset_id)
            return "skipped"
        claim = _Claim(dataset_id, name, row.source, row.split, row.archive_key, row.archive_sha256)
    store = make_store(settings)
    scratch = settings.checkpoint_root / SCRATCH / f"{dataset_id}-{os.getpid()}"
    log.info("preparing data set %s from %s", dataset_id, claim.source)
    try:
        _clear_leftovers(settings, dataset_id, scratch)
        prepared = prepare(
            _members(claim, settings, store, scratch), _out_dir(settings, dataset_id), Limits.from_settings(settings)
        )
        _publish(store, prepared, dataset_id)
    except PreparationFailed as exc:
        return _fail(settings, factory, store, claim, str(exc))
    except (CheckpointFileError, StorageUnavailable) as exc:
        return _fail(settings, factory, store, claim, f"storage: {exc}")
    except Exception as exc:
        log.exception("data set %s: preparation failed", dataset_id)
        return _fail(settings, factory, store, claim, f"internal error while preparing: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _finish_ready(settings, factory, store, claim, prepared)


def _out_dir(settings: Settings, dataset_id: uuid.UUID) -> Path:
    return settings.checkpoint_root / dataset_prefix(dataset_id)


def _clear_leftovers(settings: Settings, dataset_id: uuid.UUID, scratch: Path) -> None:
    """An earlier preparation's leftovers (a killed worker's) go, and `scratch` is made: the row
    is this worker's now, whatever another delivery still does is for nothing."""
    for stale in scratch.parent.glob(f"{dataset_id}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for name in ("images.tar", "preview.png"):  # a killed worker's half-written files (app.files.atomic_file)
        for partial in _out_dir(settings, dataset_id).glob(f".{name}.*.tmp"):
            partial.unlink(missing_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)


def _members(claim: _Claim, settings: Settings, store: CheckpointStore, scratch: Path) -> Iterator[Member | Skipped]:
    if claim.source != "upload":
        yield from source_members(claim.source, claim.split, settings, scratch)
        return
    if claim.archive_key is None:
        raise PreparationFailed("the upload is missing (no archive recorded): upload the archive again")
    try:
        path = store.resume_copy(claim.archive_key)  # local: the file itself; S3: a copy under the root
    except CheckpointFileError as exc:
        raise PreparationFailed(f"the upload is missing from storage ({exc}): upload the archive again") from exc
    if not path.is_file():
        raise PreparationFailed("the upload is missing from storage: upload the archive again")
    if claim.archive_sha256 is not None and sha256_file(path) != claim.archive_sha256:
        raise PreparationFailed("the upload is damaged: its bytes no longer match the sha256 it arrived with")
    yield from archive_members(path, Limits.from_settings(settings))


def _publish(store: CheckpointStore, prepared: Prepared, dataset_id: uuid.UUID) -> None:
    """The prepared tar and the preview, at their keys, in the store (before the row names them)."""
    for path, sha256, key in (
        (prepared.images_tar, prepared.sha256, prepared_key(dataset_id)),
        (prepared.preview, prepared.preview_sha256, preview_key(dataset_id)),
    ):
        published = store.publish(path, sha256)
        if published != key:
            raise RuntimeError(f"prepare wrote {published}, expected {key}")


def _finish_ready(
    settings: Settings, factory: sessionmaker[Session], store: CheckpointStore, claim: _Claim, prepared: Prepared
) -> str:
    with session_scope(factory) as session:
        done = DatasetRepository(session).finish_preparation(
            claim.dataset_id,
            claim.worker,
            status="ready",
            prepared_key=prepared_key(claim.dataset_id),
            sha256=prepared.sha256,
            prepared_bytes=prepared.size_bytes,
            image_count=prepared.image_count,
            skipped=prepared.skipped,
            summary=prepared.summary,
            preview_key=preview_key(claim.dataset_id),
            preview_sha256=prepared.preview_sha256,
            preview_bytes=prepared.preview_bytes,
            size_bytes=prepared.size_bytes + prepared.preview_bytes,
            archive_key=None,
            error=None,
        )
    if not done:
        return _lost(settings, factory, store, claim)
    log.info(
        "data set %s ready: %d images, %d skipped (%s)",
        claim.dataset_id,
        prepared.image_count,
        prepared.skipped,
        prepared.sha256[:12],
    )
    for key in (prepared_key(claim.dataset_id), preview_key(claim.dataset_id)):
        store.discard_scratch(key)
    if claim.archive_key is not None:
        _quietly(store.delete, claim.archive_key)  # prepared: the upload is no longer needed
    return "ready"


def _fail(
    settings: Settings,
    factory: sessionmaker[Session],
    store: CheckpointStore,
    claim: _Claim,
    reason: str,
) -> str:
    """Finish the row failed with `reason`, and remove what this preparation wrote."""
    log.warning("data set %s failed: %s", claim.dataset_id, reason)
    with session_scope(factory) as session:
        done = DatasetRepository(session).finish_preparation(
            claim.dataset_id, claim.worker, status="failed", error=reason[:4000]
        )
    if not done:
        return _lost(settings, factory, store, claim)
    _remove_prepared(store, claim.dataset_id)
    if claim.archive_key is not None:
        store.discard_scratch(claim.archive_key)  # S3: the local copy; the upload itself stays with the row
    return "failed"


def _lost(settings: Settings, factory: sessionmaker[Session], store: CheckpointStore, claim: _Claim) -> str:
    """The row did not take the result: deleted meanwhile (then every file of it goes), or handed
    to another worker (which owns the files at these keys now: they stay)."""
    with session_scope(factory) as session:
        exists = DatasetRepository(session).get(claim.dataset_id) is not None
    if exists:
        log.warning("data set %s: another worker took over its preparation; leaving it to that one", claim.dataset_id)
        return "skipped"
    log.info("data set %s was deleted while it was prepared; removing its files", claim.dataset_id)
    _remove_prepared(store, claim.dataset_id)
    if claim.archive_key is not None:
        _quietly(store.delete, claim.archive_key)
    with suppress(OSError):
        _out_dir(settings, claim.dataset_id).rmdir()  # only if empty: nothing else of it is left
    return "skipped"


def _remove_prepared(store: CheckpointStore, dataset_id: uuid.UUID) -> None:
    for key in (prepared_key(dataset_id), preview_key(dataset_id)):
        _quietly(store.delete, key)


def _quietly(delete, key: str) -> None:  # type: ignore[no-untyped-def]
    """Best effort: a file left behind is garbage, not an error of the preparation."""
    try:
        delete(key)
    except (CheckpointFileError, StorageUnavailable, OSError) as exc:
        log.warning("could not remove %s: %s", key, exc)
