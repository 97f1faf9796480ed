"""A data set's preparation outlives its worker: kill -9 mid-preparation leaves the row
`preparing` under the dead worker's name; another worker's sweeper frees it once the dead one
stops checking in, sends it again, and that worker prepares it from the start. Real Celery
worker processes, PostgreSQL and Redis."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.models import Dataset, User
from app.queue import Dispatcher, Task, dispatch
from tests.e2e.conftest import process, worker_argv
from tests.worker.test_dataset_task import uploaded

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

IMAGES = 30_000  # 16x16 PNGs: several seconds of decoding, so the kill lands mid-way


def many_images_zip() -> bytes:
    rng = np.random.default_rng(0)
    tiles = []
    for _ in range(97):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
        tiles.append(buffer.getvalue())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for i in range(IMAGES):
            archive.writestr(f"noise/{i:05d}.png", tiles[i % len(tiles)])
    return buffer.getvalue()


def wait_row(factory, dataset_id: uuid.UUID, done, timeout: float, logs: list[Path]) -> Dataset:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(factory) as s:
            found = s.get(Dataset, dataset_id)
            s.expunge_all()
        if found is not None and done(found):
            return found
        time.sleep(0.02)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"data set {dataset_id} did not get there in {timeout}s:\n{tails}")


def test_kill_9_mid_preparation_and_another_worker_prepares_it(
    clean_db: Settings, settings_env: dict[str, str], tmp_path: Path, owner: User
) -> None:
    env = settings_env | {"DDPM_LEASE_TIMEOUT_S": "4", "DDPM_HEARTBEAT_INTERVAL_S": "0.5", "DDPM_RESEND_AFTER_S": "2"}
    engine = make_engine(clean_db)
    factory = make_sessionmaker(engine)
    archive = many_images_zip()
    dataset_id = uploaded(clean_db, factory, owner, archive)  # the file in the store, the row preparing
    dispatch(engine, Dispatcher(clean_db), Task.prepare(dataset_id))

    log1, log2 = tmp_path / "worker-1.log", tmp_path / "worker-2.log"
    # The first is a samples-only worker (serve's second one, compose's worker-samples): it prepares
    # too, since preparations go to the samples queue.
    with process(worker_argv(), env | {"DDPM_WORKER_ROLE": "samples"}, log1) as worker:
        claimed = wait_row(factory, dataset_id, lambda d: d.worker is not None, 120, [log1])
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    killed = wait_row(factory, dataset_id, lambda d: True, 5, [log1])
    assert (killed.status, killed.worker) == ("preparing", claimed.worker), "killed before it finished"
    assert f"data set {dataset_id} ready" not in log1.read_text()

    with process(worker_argv(), env, log2):
        done = wait_row(factory, dataset_id, lambda d: d.status in {"ready", "failed"}, 180, [log1, log2])
    text = log2.read_text()
    assert done.status == "ready", (done.error, text[-3000:])
    assert done.worker != claimed.worker and "its preparing worker is gone" in text
    assert (done.image_count, done.skipped) == (IMAGES, 0)
    folder = clean_db.checkpoint_root / "datasets" / str(dataset_id)
    assert sorted(p.name for p in folder.iterdir()) == ["images.tar", "preview.png"]  # upload gone, no leftovers
    assert hashlib.sha256((folder / "images.tar").read_bytes()).hexdigest() == done.sha256
    scratch = clean_db.checkpoint_root / "datasets" / ".scratch"
    assert not scratch.exists() or list(scratch.iterdir()) == []
    engine.dispose()
