"""The evaluation cache of a worker: the checkpoint store (local root or S3), under `evaluation/`.

Reference statistics and the digits classifier are computed once and shared by every worker and
job (worker/ddpm/evaluation/cache.py). A file is written into the local root first (atomically),
then published, as checkpoints are; S3 keeps the sha256 with the object and `resume_copy` checks
a download against it (and keeps it in the root, so the next job on this host reads it locally).
The cache is an optimisation: a store that does not answer is a miss (load) or a lost write
(save), logged, and the evaluation computes what it needs.
"""

from __future__ import annotations

import logging

from app.checkpoints.store import CheckpointFileError, CheckpointStore, StorageUnavailable
from app.files import atomic_write
from worker.ddpm.evaluation.cache import checked_name

log = logging.getLogger(__name__)

PREFIX = "evaluation/"  # store keys: evaluation/reference/<...>.npz, evaluation/networks/<...>.pt


class StoreCache:
    """`EvaluationCache` over a `CheckpointStore`."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store

    def key(self, name: str) -> str:
        return PREFIX + str(checked_name(name))

    def load(self, name: str) -> bytes | None:
        key = self.key(name)
        try:
            return self.store.resume_copy(key).read_bytes()  # S3: downloaded into the root and checked
        except (FileNotFoundError, CheckpointFileError):  # not stored (or stored without a sha256)
            return None
        except StorageUnavailable as e:
            log.warning("evaluation cache: cannot read %s (%s); computing it again", key, e)
            return None

    def save(self, name: str, data: bytes) -> None:
        key = self.key(name)
        path = self.store.resolve(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        sha256 = atomic_write(path, data)
        try:
            self.store.publish(path, sha256)
        except StorageUnavailable as e:
            log.warning("evaluation cache: cannot store %s (%s); it will be computed again", key, e)
