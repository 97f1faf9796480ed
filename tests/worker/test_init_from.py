"""A fine-tune on the worker (worker/init_from.py, LiveState.start_from), against the real
PostgreSQL with the real (tiny) training loop in-process: the claim fetches the source
checkpoint's training state, the run starts from its raw and EMA weights with a fresh optimizer,
a resumed fine-tune resumes from its own checkpoint, and a source gone by then fails the job."""

from __future__ import annotations

import uuid

import pytest
import torch
from sqlalchemy import delete, select, update

from app.auth.service import get_or_create_user
from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.jobs.service import create_job
from app.models import Checkpoint, Job, MetricPoint, utcnow
from app.spec import JobSpec
from tests.conftest import s3_client
from tests.worker.conftest import expire_lease
from worker.database_sink import DatabaseSink
from worker.ddpm.checkpoint import load_state
from worker.ddpm.distributed import Ranks
from worker.ddpm.state import LiveState
from worker.runner import JobRunner

# The source learns fast (high learning rate, short warm-up) so that 20 steps already leave a
# loss far below a fresh network's.
SOURCE = {
    "dataset": {"image_size": 8},
    "training": {
        "steps": 20,
        "batch_size": 16,
        "learning_rate": 2e-3,
        "warmup_steps": 5,
        "log_every": 10,
        "checkpoint_every": 10,
        "sample_every": 0,
    },
}
# The fine-tune (and its fresh twin): another seed, a metric point every step.
TUNE = {
    "dataset": {"image_size": 8},
    "training": {"steps": 4, "batch_size": 16, "log_every": 1, "checkpoint_every": 2, "sample_every": 0, "seed": 9},
}


def submit(factory, spec: dict, init_from: dict | None = None) -> uuid.UUID:
    if init_from is not None:
        spec = spec | {"training": spec["training"] | {"init_from": init_from}}
    with session_scope(factory) as s:
        owner = get_or_create_user(s, "owner")
        return create_job(s, JobSpec.model_validate(spec), owner=owner, settings=Settings())[0].id


def losses(factory, job_id: uuid.UUID) -> list[float]:
    with session_scope(factory) as s:
        return list(s.scalars(select(MetricPoint.loss).where(MetricPoint.job_id == job_id).order_by(MetricPoint.step)))


def job_row(factory, job_id: uuid.UUID) -> Job:
    with session_scope(factory) as s:
        job = s.get(Job, job_id)
        s.expunge_all()
        return job


def source_state_key(factory, source: uuid.UUID, step: int) -> str:
    with session_scope(factory) as s:
        return s.get(Checkpoint, (source, step)).state_path


@pytest.mark.slow  # trains three tiny jobs: ~20 s on a quiet 2-core CPU
class TestFineTune:
    def test_it_starts_from_the_source_weights_and_ema_with_a_fresh_optimizer(
        self, runner: JobRunner, factory, clean_db: Settings
    ) -> None:
        source = submit(factory, SOURCE)
        assert runner.run(source) == "succeeded"
        tune = submit(factory, TUNE, {"job": str(source), "checkpoint": 10})
        fresh = submit(factory, TUNE)  # the same seed: the same batches, timesteps and noise

        claimed = runner.claim(tune)
        assert claimed is not None and claimed.resume_from is None and claimed.unusable is None
        assert claimed.init_from == clean_db.checkpoint_root / source_state_key(factory, source, 10)

        # Step 0: the source's raw weights in the network, its EMA in the shadow, nothing in the optimizer.
        saved = load_state(claimed.init_from)
        spec = claimed.spec
        state = LiveState.build(
            spec, torch.device("cpu"), torch.contiguous_format, ranks=Ranks(), distributed=False, resume_from=None,
            init_from=claimed.init_from,
        )  # fmt: skip
        assert state.start_step == 0 and state.optimizer.state_dict()["state"] == {}
        assert state.unet.state_dict().keys() == saved.model.keys()
        for name, tensor in state.unet.state_dict().items():
            assert torch.equal(tensor, saved.model[name]), name
        shadow = state.ema.ema_model.shadow_params
        assert len(shadow) == len(saved.ema["shadow_params"])
        assert all(torch.equal(a, b) for a, b in zip(shadow, saved.ema["shadow_params"], strict=True))
        assert state.ema.ema_model.optimization_step == saved.ema["optimization_step"] == 10
        assert state.ema.ema_model.decay == spec.training.ema_decay
        assert not torch.equal(saved.model["conv_in.weight"], saved.ema["shadow_params"][0])  # two different sets

        # The worker checks the source's network again before loading it.
        other = JobSpec.model_validate(TUNE | {"model": {"channels": [16, 32]}})
        with pytest.raises(ValueError, match=r"model\.channels is \[32, 64\] there, \[16, 32\] here"):
            LiveState.build(
                other, torch.device("cpu"), torch.contiguous_format, ranks=Ranks(), distributed=False,
                resume_from=None, init_from=claimed.init_from,
            )  # fmt: skip

        assert runner.train(claimed) == "succeeded"
        assert runner.run(fresh) == "succeeded"
        tuned, untuned = losses(factory, tune), losses(factory, fresh)
        print(f"first losses: fine-tune {tuned[0]:.3f}, fresh {untuned[0]:.3f}")
        assert len(tuned) == len(untuned) == 4
        assert tuned[0] < 0.6 * untuned[0], (tuned, untuned)
        assert job_row(factory, tune).step == 4

    def test_a_resumed_fine_tune_resumes_from_its_own_checkpoint(
        self, runner: JobRunner, factory, clean_db: Settings, monkeypatch
    ) -> None:
        source = submit(factory, SOURCE | {"training": SOURCE["training"] | {"steps": 10}})
        assert runner.run(source) == "succeeded"
        tune = submit(factory, TUNE, {"job": str(source)})
        original = DatabaseSink.on_log

        def lose_lease_after_step_3(self, point) -> None:
            original(self, point)
            if point.step == 3 and self.attempt == 1:
                expire_lease(factory, self.job_id)

        monkeypatch.setattr(DatabaseSink, "on_log", lose_lease_after_step_3)
        assert runner.run(tune) == "fenced"
        # The source's checkpoints go (rotated, say): the resumed attempt does not need them.
        with session_scope(factory) as s:
            s.execute(delete(Checkpoint).where(Checkpoint.job_id == source))
        claimed = runner.claim(tune)
        assert claimed is not None and claimed.init_from is None and claimed.unusable is None
        assert claimed.resume_from is not None and claimed.resume_from.name == "step-00000002.safetensors"
        assert runner.train(claimed) == "succeeded"
        assert job_row(factory, tune).step == 4


class TestSourceGone:
    """The source checked at submit is gone by the claim: the job fails, saying what went."""

    @pytest.fixture
    def source(self, factory, clean_db: Settings) -> uuid.UUID:
        """A source job with a checkpoint row at step 10 (files written only where a test needs them)."""
        source = submit(factory, SOURCE)
        with session_scope(factory) as s:
            key = f"{source}/attempt-1/step-00000010"
            s.add(
                Checkpoint(
                    job_id=source, step=10, path=f"{key}.safetensors", size_bytes=1, sha256="0" * 64,
                    state_path=f"{key}.state.safetensors",
                )
            )  # fmt: skip
        return source

    def run_to_failure(self, runner: JobRunner, factory, tune: uuid.UUID) -> str:
        assert runner.run(tune) == "failed"
        job = job_row(factory, tune)
        assert job.status == "failed" and job.attempt == 1 and job.error
        return job.error

    def test_its_checkpoint_rotated_out(self, runner: JobRunner, factory, source: uuid.UUID) -> None:
        tune = submit(factory, TUNE, {"job": str(source)})
        with session_scope(factory) as s:
            s.execute(delete(Checkpoint).where(Checkpoint.job_id == source))
        assert self.run_to_failure(runner, factory, tune) == (
            f"training.init_from: job {source} no longer has its checkpoint at step 10 (replaced by newer ones: "
            "training.keep_checkpoints); submit again naming a checkpoint it keeps"
        )

    def test_the_source_deleted(self, runner: JobRunner, factory, source: uuid.UUID) -> None:
        tune = submit(factory, TUNE, {"job": str(source)})
        with session_scope(factory) as s:
            s.execute(update(Job).where(Job.id == source).values(deleted_at=utcnow()))
        assert self.run_to_failure(runner, factory, tune) == (
            f"training.init_from: job {source} was deleted before this job started; its weights are gone"
        )

    def test_its_file_missing_from_storage(self, runner: JobRunner, factory, source: uuid.UUID) -> None:
        tune = submit(factory, TUNE, {"job": str(source)})
        assert self.run_to_failure(runner, factory, tune) == (
            f"training.init_from: job {source}'s checkpoint at step 10 is missing from storage"
        )


@pytest.mark.slow  # trains two tiny jobs against moto
def test_on_s3_a_host_without_the_source_files_downloads_its_state(s3_settings: Settings, tmp_path) -> None:
    factory = make_sessionmaker(make_engine(s3_settings))
    short = {"steps": 2, "checkpoint_every": 2, "log_every": 1}
    source = submit(factory, SOURCE | {"training": SOURCE["training"] | short})
    assert JobRunner(s3_settings, factory).run(source) == "succeeded"
    key = source_state_key(factory, source, 2)
    assert not (s3_settings.checkpoint_root / key).exists()  # the bucket holds it, not this host's scratch

    elsewhere = s3_settings.model_copy(update={"checkpoint_dir": tmp_path / "other-host"})
    runner = JobRunner(elsewhere, factory)
    tune = submit(factory, TUNE | {"training": TUNE["training"] | {"steps": 1}}, {"job": str(source)})
    claimed = runner.claim(tune)
    assert claimed is not None and claimed.init_from == elsewhere.checkpoint_root / key
    object_bytes = s3_client(s3_settings).get_object(Bucket=s3_settings.s3_bucket, Key=f"ckpt/{key}")["Body"].read()
    assert claimed.init_from.read_bytes() == object_bytes
    assert runner.train(claimed) == "succeeded"
