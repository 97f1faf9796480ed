"""The DDPM training loop, readable top to bottom.

One step: learning rate -> batch (x0, t, eps) -> x_t -> U-Net forward -> MSE to the target (per
image, optionally min-SNR weighted) -> backward -> clip -> optimizer step -> zero_grad -> EMA update
-> (every log_every) metric point -> (every checkpoint_every, and at the end) checkpoint
-> (every sample_every) sample grid -> (every evaluation.every, and at the end) FID and KID of
samples (worker/ddpm/evaluation/).
What the step changes (model, optimizer, EMA, noise generator, metric window) is one `LiveState`
(worker/ddpm/state.py), which also saves and restores itself for exact resume. Progress leaves
through a `TrainingSink` (worker/ddpm/sink.py), so this module knows nothing about databases or
queues; `_Reporter` holds the one rule for what the sink hears when.

Every CPU-GPU synchronisation is marked with ``# SYNC``: they decide the speed on a GPU. A step
has none: the loss is summed on the device and read once per metric point, a NaN/inf step is
skipped by masking (fused AdamW's `found_inf`, a zero EMA weight) rather than by a host branch, and
checkpoint files are serialised and fsynced on a background thread. On CUDA the forward pass runs
in bf16 autocast with TF32 matmuls and channels_last; the step itself (worker/ddpm/step.py) splits
the batch into micro-batches (`training.micro_batch`, halved when a step runs out of memory), and
is compiled and, on one GPU, captured and replayed as one CUDA graph (`training.compile`).
Each metric point carries images/s, MFU and peak GPU memory (worker/ddpm/efficiency.py).

A multi-GPU job runs this loop in each of its k processes (`ranks`, worker/ddpm/distributed.py):
each trains on its share of every global batch under DistributedDataParallel, the loss is
all-reduced on the device each step (no host sync), and rank 0 alone reports and evaluates.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from app.spec import JobSpec, TrainingSpec
from app.spec_size import dataset_on_device
from worker.ddpm.checkpoint import TrainingState, write_checkpoint
from worker.ddpm.data import BatchIndexer, DeviceBatches, HostBatches, load_images, to_model_range
from worker.ddpm.distributed import Ranks, agree_to_stop
from worker.ddpm.efficiency import Efficiency
from worker.ddpm.evaluation.cache import EvaluationSetup, MemoryCache
from worker.ddpm.evaluation.evaluate import Evaluator
from worker.ddpm.model import unet_config
from worker.ddpm.sampling import sample_images, save_grid_png
from worker.ddpm.schedule import NoiseSchedule
from worker.ddpm.sink import (
    MetricPoint,
    SavedCheckpoint,
    SavedSample,
    StopReason,
    StopTraining,
    TrainingEvent,
    TrainingSink,
    TrainResult,
)
from worker.ddpm.state import EMA_POWER, LiveState, WindowValues, derive_seed, ema_state_dict
from worker.ddpm.step import StepPlan, TrainStep, step_plan

__all__ = [
    "EMA_POWER",
    "SAMPLE_GRID_SAMPLER",
    "SAMPLE_GRID_SEED",
    "SAMPLE_GRID_STEPS",
    "NonFiniteLossError",
    "derive_seed",
    "draw_sample_grid",
    "ema_state_dict",
    "learning_rate",
    "resolve_device",
    "train",
]

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient; training cannot go on."""

    @classmethod
    def at(cls, step: int, max_nonfinite: int) -> NonFiniteLossError:
        return cls(
            f"non-finite loss at step {step} ({max_nonfinite} consecutive steps skipped; "
            "lower training.learning_rate or training.grad_clip, or check the data)"
        )


def learning_rate(step: int, cfg: TrainingSpec) -> float:
    """Linear warm-up from 0 to the peak over `warmup_steps` (1-based step 1 already gets lr/warmup), then constant.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * step / cfg.warmup_steps
    return cfg.learning_rate


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _use_fast_cuda_math() -> None:
    """TF32 matmuls and convolutions, and cuDNN's autotuner (fixed shapes: it picks the fastest kernels once)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def _training_device(device: str | None) -> torch.device:
    dev = resolve_device(device)
    if dev.type == "cuda":
        _use_fast_cuda_math()
    return dev


def _memory_format(dev: torch.device) -> torch.memory_format:
    """channels_last on CUDA (tensor-core convolutions want NHWC); on CPU it measured no faster here."""
    return torch.channels_last if dev.type == "cuda" else torch.contiguous_format


def train(
    spec: JobSpec,
    checkpoint_dir: Path,
    sink: TrainingSink,
    *,
    resume_from: Path | None = None,
    init_from: Path | None = None,
    device: str | None = None,
    max_nonfinite: int = 5,
    ranks: Ranks | None = None,
    images_file: Path | None = None,
    data_on_device: bool | None = None,
    evaluation: EvaluationSetup | None = None,
    peak_flops: float | None = None,
) -> TrainResult:
    """Train (or continue training) the job's U-Net; see the module docstring for one step.

    `resume_from`: a served ``step-XXXXXXXX.safetensors``; its ``.state.safetensors`` sibling
    restores weights, optimizer, EMA and RNGs: training goes on exactly as if it had never stopped.
    `init_from`: a fine-tune's source ``.state.safetensors`` (unused when resuming): `LiveState.start_from`.
    `ranks`: a process of a distributed job (worker/ddpm/distributed.py), in a joined process group.
    `images_file`, `data_on_device`: see `_NoisyBatches`. `evaluation`: `_evaluator`.
    `peak_flops`: the device's dense bf16 peak (FLOP/s) for MFU, when its name is not in
    `worker.ddpm.efficiency`'s table.
    """
    distributed = ranks is not None
    ranks = ranks or Ranks()
    dev = _training_device(device)
    cfg = spec.training

    # Data: the whole set on the device, or streamed from the host a step ahead; noised on the device.
    data = _NoisyBatches(spec, dev, ranks, images_file, data_on_device)
    # Model, optimizer, EMA, noise generator and metric window: fresh (a fine-tune: its source's weights) or resumed.
    start = {"resume_from": resume_from, "init_from": init_from}
    plan = step_plan(cfg.compile, dev, distributed)
    state = LiveState.build(
        spec, dev, data.layout, ranks=ranks, distributed=distributed, capturable=plan is StepPlan.captured, **start
    )
    share = cfg.batch_size // ranks.world_size
    train_step = TrainStep(
        state, data.schedule, plan, distributed=distributed, max_nonfinite=max_nonfinite, share=share
    )
    efficiency = Efficiency.measure(spec, dev, peak_flops, ranks.world_size) if ranks.is_main else None
    step = state.start_step  # optimizer steps done so far

    evaluator = _evaluator(spec, evaluation, data, ranks)
    with data, _Reporter(checkpoint_dir, sink, state, evaluator, train_step.events, efficiency) as reporter:
        while step < cfg.steps:
            step += 1

            # Learning rate for this step.
            lr = learning_rate(step, cfg)
            state.set_learning_rate(lr)

            # Batch: clean images (random_flip: some mirrored), a timestep each, noise; x_t by eq. 4 of Ho et al. 2020.
            x_t, t, target = data.draw(step, state.noise)  # (B/k, C, H, W), (B/k,), (B/k, C, H, W)

            # Forward / backward per micro-batch, clip, update unless NaN/inf, EMA, metric window:
            # eager, compiled, or replayed as one CUDA graph (worker/ddpm/step.py).
            train_step(step, x_t, t, target)

            # Report (metric point, checkpoint, sample grid) when one is due.
            due = _Due.at(step, spec)
            if not due:
                continue
            values = state.window.read()  # SYNC (see Window.read)
            if values.failed_at:
                raise NonFiniteLossError.at(values.failed_at, max_nonfinite)
            stopped = reporter.report(step, lr, values, due) if ranks.is_main else None
            if distributed and agree_to_stop(stopped is not None, dev):  # SYNC: every rank leaves together
                return stopped or TrainResult(final_step=step, last_loss=None, stopped=StopReason.followed)
            if stopped is not None:
                return stopped
            if due.log and not ranks.is_main:
                state.window.start_next(values)

    return TrainResult(final_step=step, last_loss=reporter.last_loss)


def _evaluator(spec: JobSpec, setup: EvaluationSetup | None, data: _NoisyBatches, ranks: Ranks) -> Evaluator | None:
    """Rank 0's evaluator when the spec evaluates (evaluation.every > 0), else None. Its cache and
    Inception weights come from `setup` (the worker's: its checkpoint store); without one, a
    process-local cache and no Inception (the digits set is still evaluated)."""
    if not spec.evaluation.every or not ranks.is_main:
        return None
    return Evaluator(spec, setup or EvaluationSetup(MemoryCache()), data.images.images, data.dev)


class _NoisyBatches:
    """Each step's batch: clean images (from the device, or streamed from the host), optionally
    flipped, noised; what the U-Net sees and what it should predict.

    The set goes on the device when `app.spec_size.dataset_on_device` says it fits (a batch is an
    index gather there); otherwise each batch is gathered on the host and copied one step ahead,
    so the step does not wait. `on_device` forces either. The batches are the same."""

    def __init__(
        self, spec: JobSpec, dev: torch.device, ranks: Ranks, images_file: Path | None, on_device: bool | None
    ) -> None:
        cfg = spec.training
        images = load_images(spec.dataset, images_file)  # (N, C, H, W) uint8 on the host
        if on_device is None:
            on_device = dataset_on_device(_with_image_count(spec, len(images)), _device_memory(dev))
        seed = derive_seed(cfg.seed, "batches")
        self.images: DeviceBatches | HostBatches = (
            DeviceBatches(images.to(dev), BatchIndexer(len(images), cfg.batch_size, seed, dev), ranks.share)
            if on_device
            else HostBatches(images, BatchIndexer(len(images), cfg.batch_size, seed), dev, ranks.share)
        )
        self.schedule = NoiseSchedule(spec.diffusion).to(dev)
        self.layout = _memory_format(dev)
        self.spec, self.dev, self.ranks = spec, dev, ranks

    def __enter__(self) -> _NoisyBatches:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.images.close()

    def draw(self, step: int, noise: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, target) for 1-based `step`. Every rank draws the whole global batch's t, eps and
        flips (the same numbers, same seed) and keeps its share; one process keeps it all."""
        batch_size, share = self.spec.training.batch_size, self.ranks.share
        x0 = to_model_range(self.images.batch(step - 1))  # (B/k, C, H, W) in [-1, 1]
        t = torch.randint(0, self.spec.diffusion.timesteps, (batch_size,), generator=noise, device=self.dev)  # (B,)
        eps = torch.randn((batch_size, *x0.shape[1:]), generator=noise, device=self.dev)  # (B, C, H, W)
        if self.spec.dataset.random_flip:  # drawn only then: a job without flips keeps its numbers
            x0 = flip_horizontally(x0, share(random_flips(batch_size, noise, self.dev)))
        t, eps = share(t), share(eps)  # (B/k,), (B/k, C, H, W)
        x_t = self.schedule.add_noise(x0, eps, t).contiguous(memory_format=self.layout)  # eq. 4: (B/k, C, H, W)
        return x_t, t, self.schedule.target(x0, eps, t)  # target: (B/k, C, H, W)


def random_flips(batch_size: int, noise: torch.Generator, dev: torch.device) -> torch.Tensor:
    """Which images of a global batch are flipped: each with probability 1/2, from the noise stream. (B,) bool"""
    return torch.rand((batch_size,), generator=noise, device=dev) < 0.5


def flip_horizontally(x0: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """x0 with the images where `flips` is set mirrored left to right. (B, C, H, W)"""
    return torch.where(flips[:, None, None, None], x0.flip(-1), x0)  # (B, C, H, W)


def _with_image_count(spec: JobSpec, count: int) -> JobSpec:
    """The spec with the data set's real size (a `folder` set's is only known once it is read)."""
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"image_count": count})})


def _device_memory(dev: torch.device) -> int | None:
    """The training device's memory in bytes: a GPU's total; None for the CPU (host memory)."""
    return torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None


@dataclass(frozen=True)
class _Due:
    """Which reports fall on a step; the last step has all of them (a sample grid only if grids are on)."""

    log: bool
    checkpoint: bool
    sample: bool
    evaluate: bool = False

    @classmethod
    def at(cls, step: int, spec: JobSpec) -> _Due:
        """With `keep_best`, an evaluation step saves a checkpoint too: the best one must exist."""
        cfg, every = spec.training, spec.evaluation.every or 0
        last = step == cfg.steps
        evaluate = every > 0 and (step % every == 0 or last)
        return cls(
            log=step % cfg.log_every == 0 or last,
            checkpoint=step % cfg.checkpoint_every == 0 or last or (cfg.keep_best and evaluate),
            sample=cfg.sample_every > 0 and (step % cfg.sample_every == 0 or last),
            evaluate=evaluate,
        )

    def __bool__(self) -> bool:
        return self.log or self.checkpoint or self.sample or self.evaluate


class _Reporter:
    """Rank 0's side of a report step: what the sink hears and when, and the throughput clock.

    The rule, stated here once: the sink hears of everything in step order, a checkpoint before the
    sample grid of its step and both before its evaluation (the order live watchers read). So a
    checkpoint still being written in the background is reported, once its files are whole, before
    anything newer: a metric point, a checkpoint, a sample grid or an evaluation. A `StopTraining`
    from the sink ends the run at the step of what it was just told (that pending checkpoint's step,
    else this step); a stop at a metric point whose reason is `checkpoint_first` (a shutdown, a
    cancel) first saves and reports a checkpoint of this step.
    Waiting for checkpoint writes, drawing sample grids and evaluating are kept out of images/s.
    """

    def __init__(
        self,
        checkpoint_dir: Path,
        sink: TrainingSink,
        state: LiveState,
        evaluator: Evaluator | None = None,
        events: list[TrainingEvent] | None = None,
        efficiency: Efficiency | None = None,
    ) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.sink, self.state, self.spec, self.evaluator = sink, state, state.spec, evaluator
        self.events = events if events is not None else []  # the step's, told at the next report
        self.efficiency = efficiency
        self.samples_dir = checkpoint_dir / "samples"
        self.writer = _CheckpointWriter(checkpoint_dir, unet_config(state.spec))
        self.last_loss: float | None = None  # of the latest metric point
        self._clock_start, self._clock_step = time.perf_counter(), state.start_step  # where the throughput window began

    def __enter__(self) -> _Reporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.writer.close()

    def report(self, step: int, lr: float, values: WindowValues, due: _Due) -> TrainResult | None:
        """Tell the sink what is new at `step`; the result to end with when it stops training, else None."""
        with self._off_the_clock():
            previous = self.writer.take()
        if previous is not None:
            try:
                self.sink.on_checkpoint(previous)
            except StopTraining as stop:
                return TrainResult(final_step=previous.step, last_loss=self.last_loss, stopped=stop.reason)
        try:
            while self.events:  # they happened at this step or before it
                self.sink.on_event(self.events.pop(0))
            if due.log:
                values = self._log(step, lr, values)
            if due.checkpoint:
                self._checkpoint(step, values)
            if due.sample:
                self._sample(step)
            if due.evaluate:
                self._evaluate(step)
        except StopTraining as stop:
            return TrainResult(final_step=step, last_loss=self.last_loss, stopped=stop.reason)
        return None

    def _log(self, step: int, lr: float, values: WindowValues) -> WindowValues:
        """The window's metric point; starts the next window and returns its values."""
        now = time.perf_counter()
        images = (step - self._clock_step) * self.spec.training.batch_size
        images_per_s = images / (now - self._clock_start)
        point = MetricPoint(
            step=step,
            loss=values.mean_loss,
            lr=lr,
            images_per_s=images_per_s,
            loss_by_t=values.loss_by_t,
            mfu=self.efficiency.mfu(images_per_s) if self.efficiency else None,
            peak_memory_bytes=self.efficiency.peak_memory_bytes() if self.efficiency else None,
        )
        values = self.state.window.start_next(values)
        self._clock_start, self._clock_step = now, step
        self.last_loss = point.loss
        try:
            self.sink.on_log(point)
        except StopTraining as stop:
            if stop.reason.checkpoint_first:
                saved = self.writer.write(self.state.snapshot(step, values))
                with contextlib.suppress(StopTraining):  # it is stopping already
                    self.sink.on_checkpoint(saved)
            raise
        return values

    def _checkpoint(self, step: int, values: WindowValues) -> None:
        """Tensors copied now, files written in the background: the sink hears of it at the next
        report, or at once when this is the last step."""
        with self._off_the_clock():
            if step == self.spec.training.steps:
                self.sink.on_checkpoint(self.writer.write(self.state.snapshot(step, values)))
            else:
                self.writer.submit(self.state.snapshot(step, values))

    def _sample(self, step: int) -> None:
        """A grid from the EMA weights, drawn while this step's checkpoint is still being written."""
        unet, ema = self.state.unet, self.state.ema.ema_model
        with self._off_the_clock():
            drawn = draw_sample_grid(self.spec, unet, ema, step, self.samples_dir, self.state.dev)
            previous = self.writer.take()
        if previous is not None:
            self.sink.on_checkpoint(previous)
        self.sink.on_sample(drawn)

    def _evaluate(self, step: int) -> None:
        """FID and KID from the EMA weights, computed while this step's checkpoint may still be
        written; the sink hears of that checkpoint first."""
        if self.evaluator is None:
            return
        with self._off_the_clock():
            point = self.evaluator.evaluate(step, self.state.unet, self.state.ema.ema_model)
            previous = self.writer.take()
        if previous is not None:
            self.sink.on_checkpoint(previous)
        if point is not None:
            self.sink.on_evaluation(point)

    @contextlib.contextmanager
    def _off_the_clock(self) -> Iterator[None]:
        """Keep the time spent inside out of images/s."""
        start = time.perf_counter()
        yield
        self._clock_start += time.perf_counter() - start


class _CheckpointWriter:
    """Serialises and writes one checkpoint at a time on a background thread.

    The training thread hands over host copies of the tensors (`LiveState.snapshot`) and goes on
    training; `take()` waits for the write and returns what was written (re-raising a failed write),
    so the caller tells the sink only about whole files. A second `submit` waits for the first to
    be taken.
    """

    def __init__(self, checkpoint_dir: Path, config: dict[str, Any]) -> None:
        self.checkpoint_dir, self.config = checkpoint_dir, config
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future[SavedCheckpoint] | None = None

    def submit(self, snapshot: tuple[dict[str, torch.Tensor], TrainingState]) -> None:
        assert self._pending is None, "take() the previous checkpoint first"
        self._pending = self._pool.submit(self._write, *snapshot, submitted=time.perf_counter())

    def take(self) -> SavedCheckpoint | None:
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def write(self, snapshot: tuple[dict[str, torch.Tensor], TrainingState]) -> SavedCheckpoint:
        """Submit and wait: for a checkpoint reported at once (the last step, a shutdown)."""
        self.submit(snapshot)
        saved = self.take()
        assert saved is not None
        return saved

    def close(self) -> None:
        """Wait for a write still running (so no file appears after `train` returns)."""
        self._pool.shutdown(wait=True)

    def _write(self, served: dict[str, torch.Tensor], state: TrainingState, submitted: float) -> SavedCheckpoint:
        written = write_checkpoint(self.checkpoint_dir, served_weights=served, unet_config=self.config, state=state)
        return SavedCheckpoint(
            step=state.step,
            path=written.path,
            sha256=written.sha256,
            size_bytes=written.size_bytes,
            state_path=written.state_path,
            write_s=time.perf_counter() - submitted,
        )


# Periodic grids use DDIM (eta = 0) over this many steps: a few seconds, not T network calls.
SAMPLE_GRID_SAMPLER, SAMPLE_GRID_STEPS, SAMPLE_GRID_SEED = "ddim", 50, 0


def draw_sample_grid(
    spec: JobSpec, unet: torch.nn.Module, ema: EMAModel, step: int, out_dir: Path, dev: torch.device
) -> SavedSample:
    """A PNG grid of `sample_count` images drawn from the EMA weights, with a fixed seed so that
    grids compare over time. The copy of the network keeps training's modules and RNG untouched
    (a fresh U-Net would draw its init from the global RNG)."""
    sampler_net = copy.deepcopy(unet).eval()
    sampler_net.load_state_dict(ema_state_dict(unet, ema))
    images = sample_images(
        sampler_net,
        spec,
        spec.training.sample_count,
        SAMPLE_GRID_SEED,
        dev,
        sampler=SAMPLE_GRID_SAMPLER,
        steps=SAMPLE_GRID_STEPS,
    )
    path = out_dir / f"step-{step:08d}.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    sha256 = save_grid_png(images, path)
    return SavedSample(step=step, path=path, sha256=sha256, size_bytes=path.stat().st_size)
