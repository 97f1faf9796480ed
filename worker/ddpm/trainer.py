"""The DDPM training loop, readable top to bottom.

One step: learning rate -> batch (x0, t, eps) -> x_t -> U-Net forward -> MSE to the target ->
backward -> clip -> optimizer step -> zero_grad -> EMA update -> (every log_every) metric point
-> (every checkpoint_every, and at the end) checkpoint. Progress leaves through a `TrainingSink`,
so this module knows nothing about databases or queues.

Every CPU-GPU synchronisation is marked with ``# SYNC``: they decide the speed on a GPU. A step
has none: the loss is summed on the device and read once per metric point, a NaN/inf step is
skipped by masking (fused AdamW's `found_inf`, a zero EMA weight) rather than by a host branch, and
checkpoint files are serialised and fsynced on a background thread. On CUDA the forward pass runs
in bf16 autocast with TF32 matmuls, channels_last and `torch.compile` (`training.compile`).

A multi-GPU job runs this loop in each of its k processes (`ranks`, worker/ddpm/distributed.py):
each trains on its share of every global batch under DistributedDataParallel, the loss is
all-reduced on the device each step (no host sync), and rank 0 alone reports.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from torch.nn.parallel import DistributedDataParallel

from app.spec import JobSpec, TrainingSpec
from worker.ddpm.checkpoint import TrainingState, load_state, state_path_for, write_checkpoint
from worker.ddpm.data import BatchIndexer, load_images, to_model_range
from worker.ddpm.distributed import Ranks, agree_to_stop, mean_over_ranks
from worker.ddpm.model import build_unet, unet_config
from worker.ddpm.sampling import sample_images, save_grid_png
from worker.ddpm.schedule import NoiseSchedule
from worker.ddpm.sink import (
    MetricPoint,
    SavedCheckpoint,
    SavedSample,
    StopReason,
    StopTraining,
    TrainingSink,
    TrainResult,
)

log = logging.getLogger(__name__)

# EMA warm-up (diffusers EMAModel, use_ema_warmup): decay_k = min(ema_decay, 1 - (1 + k)^-power).
# power 3/4 suits runs of up to ~100k steps (0.999 reached at 10k steps); it is what diffusers'
# unconditional training example uses.
EMA_POWER = 0.75


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient; training cannot go on."""


def learning_rate(step: int, cfg: TrainingSpec) -> float:
    """Linear warm-up from 0 to the peak over `warmup_steps` (1-based step 1 already gets lr/warmup), then constant.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * step / cfg.warmup_steps
    return cfg.learning_rate


def derive_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed per random stream, so weights, batches and noise never share one."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class _Window:
    """What the loop accumulates between metric points, kept on the device so that a step never
    waits for the host; read once per metric point or checkpoint (and saved with the state, for
    exact resume)."""

    def __init__(self, dev: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=dev)  # sum of the finite losses since the last point
        self.loss_count = torch.zeros((), dtype=torch.int64, device=dev)  # finite steps since the last point
        self.nonfinite_streak = torch.zeros((), dtype=torch.int64, device=dev)  # consecutive skipped steps
        self.nonfinite_total = torch.zeros((), dtype=torch.int64, device=dev)
        self.failed_at = torch.zeros((), dtype=torch.int64, device=dev)  # step the streak hit the limit; 0: never

    def add(self, step: int, loss: torch.Tensor, finite: torch.Tensor, max_nonfinite: int) -> None:
        """Count one step; `finite` (0-d bool) says whether its update was applied."""
        self.loss_sum.add_(torch.where(finite, loss, 0.0))
        self.loss_count.add_(finite)
        self.nonfinite_streak.add_(1).mul_(finite.logical_not())
        self.nonfinite_total.add_(finite.logical_not())
        self.failed_at.masked_fill_((self.nonfinite_streak >= max_nonfinite) & (self.failed_at == 0), step)

    def read(self) -> _WindowValues:
        # SYNC: one host read of the window's accumulators (waits for the device to finish the window).
        mean = self.loss_sum / self.loss_count  # NaN when every step of the window was skipped
        counters = (self.loss_count, self.nonfinite_streak, self.nonfinite_total, self.failed_at)
        mean_value, *rest = torch.stack([mean.double(), *(c.double() for c in counters)]).tolist()
        count, streak, total, failed_at = (int(v) for v in rest)
        return _WindowValues(mean_value, count, streak, total, failed_at)

    def start_next(self) -> None:
        self.loss_sum.zero_()
        self.loss_count.zero_()

    def restore(self, loss_sum: torch.Tensor, values: dict[str, int]) -> None:
        self.loss_sum.copy_(loss_sum)
        self.loss_count.fill_(values["loss_count"])
        self.nonfinite_streak.fill_(values["nonfinite_streak"])
        self.nonfinite_total.fill_(values["nonfinite_total"])


@dataclass(frozen=True)
class _WindowValues:
    mean_loss: float
    loss_count: int
    nonfinite_streak: int
    nonfinite_total: int
    failed_at: int  # 0 unless the streak of skipped steps reached max_nonfinite


class _DeviceEMA:
    """diffusers' `EMAModel` update, with the update count on the device.

    A skipped (non-finite) step must not advance the EMA; keeping the count on the device lets the
    update be masked (weight 0) instead of branched on with a host read. The decay follows
    EMAModel.get_decay with use_ema_warmup: 0 for the first update, then min(ema_decay,
    1 - k^-power) for the k-th. `ema` stays the state's container, so checkpoints keep EMAModel's
    state_dict format.
    """

    def __init__(self, ema: EMAModel, params: list[torch.nn.Parameter], decay: float, dev: torch.device) -> None:
        self.ema, self.params, self.decay = ema, params, decay
        self.updates = torch.full((), float(ema.optimization_step), dtype=torch.float64, device=dev)

    @torch.no_grad()
    def step(self, finite: torch.Tensor) -> None:
        self.updates.add_(finite)  # k, this update included when it applies
        warm = self.updates - 1  # EMAModel: step = optimization_step - 1
        decay = torch.where(warm > 0, (1 - (1 + warm) ** -EMA_POWER).clamp(max=self.decay), 0.0)
        weight = ((1 - decay) * finite).float()  # 0 for a skipped step: the shadow stays exactly as it was
        delta = torch._foreach_sub(self.params, self.ema.shadow_params)  # p - s
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(self.ema.shadow_params, delta)  # s + w (p - s)

    def sync_to_host(self) -> None:
        # SYNC: the update count, for EMAModel's state_dict (checkpoints only).
        self.ema.optimization_step = int(self.updates.item())


def compile_options(cfg: TrainingSpec, dev: torch.device, distributed: bool) -> dict[str, Any] | None:
    """torch.compile's keyword arguments for the forward pass and loss, or None to run eagerly.

    `graphs` replays the compiled step as CUDA graphs (mode "reduce-overhead"): measured 1.44x
    plain compilation for ddpm-cifar10 at batch 128 on an H200 (BENCHMARKS.md). Not under DDP,
    whose gradient hooks a captured graph would skip, and not on the CPU: there it is plain `on`.
    """
    if cfg.compile == "off" or (cfg.compile == "auto" and dev.type != "cuda"):
        return None
    if cfg.compile == "graphs" and dev.type == "cuda" and not distributed:
        return {"mode": "reduce-overhead"}
    return {}


def _memory_format(dev: torch.device) -> torch.memory_format:
    """channels_last on CUDA (tensor-core convolutions want NHWC); on CPU it measured no faster here."""
    return torch.channels_last if dev.type == "cuda" else torch.contiguous_format


def train(
    spec: JobSpec,
    checkpoint_dir: Path,
    sink: TrainingSink,
    *,
    resume_from: Path | None = None,
    device: str | None = None,
    max_nonfinite: int = 5,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train (or continue training) the job's U-Net; see the module docstring for one step.

    `resume_from` is a served weights file ``step-XXXXXXXX.safetensors``; its sibling
    ``.state.safetensors`` restores weights, optimizer, EMA and RNGs, and training continues at
    the next step exactly as if it had never stopped.

    With `ranks` (a process of a distributed job, in a process group already joined; see
    worker/ddpm/distributed.py) the U-Net trains under DistributedDataParallel on this rank's
    share of each global batch, and only rank 0 talks to the sink; the others ignore it.
    """
    distributed = ranks is not None
    ranks = ranks or Ranks()
    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    cfg = spec.training
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    layout = _memory_format(dev)

    # Data: the whole set on the device as uint8; a batch is an index gather, no host copy.
    images = load_images(spec.dataset).to(dev)  # (N, C, H, W) uint8
    batches = BatchIndexer(len(images), cfg.batch_size, derive_seed(cfg.seed, "batches"), dev)
    schedule = NoiseSchedule(spec.diffusion).to(dev)

    # Model, optimizer, EMA, noise generator. Fused AdamW (CPU and CUDA): one kernel per step, and
    # its `found_inf` input skips a non-finite step on the device (see the update below).
    torch.manual_seed(cfg.seed)
    unet = build_unet(spec).to(dev, memory_format=layout).train()
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    skip = torch.zeros((), device=dev)  # 1.0 while the current step's loss or gradient is NaN/inf
    optimizer.found_inf = skip  # read by AdamW.step(): the fused kernel leaves everything as it was
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=EMA_POWER, foreach=True)
    noise = torch.Generator(dev).manual_seed(derive_seed(cfg.seed, "noise"))  # draws t and eps
    window = _Window(dev)
    step = 0  # optimizer steps done so far
    if resume_from is not None:
        step = _restore(Path(resume_from), spec, unet, optimizer, ema, noise, window, dev)
    if not ranks.is_main:
        # Dropout draws from the global RNG: other ranks draw other masks (rank 0 keeps the
        # single-process stream, which is what the checkpoint saves), reproducibly per resume step.
        torch.manual_seed(derive_seed(cfg.seed, f"rank-{ranks.rank}-from-{step}"))
    ema_update = _DeviceEMA(ema, params, cfg.ema_decay, dev)
    # DDP broadcasts rank 0's weights at construction and averages gradients in backward.
    model = DistributedDataParallel(unet, gradient_as_bucket_view=True) if distributed else unet

    def forward_loss(x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # bf16 autocast for the forward pass on CUDA; the loss is computed in fp32. CPU stays fp32.
        # (The context is entered here, not built outside, so that torch.compile traces it.)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on_cuda):
            prediction = model(x_t, t, return_dict=False)[0]  # (B, C, H, W)
        return F.mse_loss(prediction.float(), target)

    options = compile_options(cfg, dev, distributed)
    graphs = options is not None and options.get("mode") == "reduce-overhead"
    loss_of = torch.compile(forward_loss, **options) if options is not None else forward_loss
    compile_checked = loss_of is forward_loss

    writer = _CheckpointWriter(checkpoint_dir, unet_config(spec))
    last_loss: float | None = None
    window_start, window_images = time.perf_counter(), 0

    def report(
        step: int, lr: float, values: _WindowValues, log_now: bool, checkpoint_now: bool, sample_now: bool
    ) -> TrainResult | None:
        """Rank 0's side of a report step: tell the sink what is new, in step order. Returns the
        result to end with when the sink stops training, None to go on."""
        nonlocal window_start, window_images, last_loss
        # The previous checkpoint is committed (its files are whole by now) before anything newer
        # is reported. A stop there ends the run at that checkpoint's step.
        wait_start = time.perf_counter()
        previous = writer.take()
        window_start += time.perf_counter() - wait_start  # keep checkpoint writes out of images/s
        if previous is not None:
            try:
                sink.on_checkpoint(previous)
            except StopTraining as stop:
                return TrainResult(final_step=previous.step, last_loss=last_loss, stopped=stop.reason)

        # Metric point.
        if log_now:
            now = time.perf_counter()
            point = MetricPoint(
                step=step, loss=values.mean_loss, lr=lr, images_per_s=window_images / (now - window_start)
            )
            window.start_next()
            values = _WindowValues(float("nan"), 0, values.nonfinite_streak, values.nonfinite_total, 0)
            window_start, window_images = now, 0
            last_loss = point.loss
            try:
                sink.on_log(point)
            except StopTraining as stop:
                if stop.reason.checkpoint_first:
                    writer.submit(_snapshot(spec, step, unet, optimizer, ema_update, noise, window, values, dev))
                    saved = writer.take()
                    assert saved is not None
                    with contextlib.suppress(StopTraining):
                        sink.on_checkpoint(saved)
                return TrainResult(final_step=step, last_loss=last_loss, stopped=stop.reason)

        # Checkpoint: tensors copied here, files written in the background; the sink hears of it
        # at the next metric point or checkpoint, or below when this is the last step.
        if checkpoint_now:
            save_start = time.perf_counter()
            writer.submit(_snapshot(spec, step, unet, optimizer, ema_update, noise, window, values, dev))
            if step == cfg.steps:
                saved = writer.take()
                assert saved is not None
                try:
                    sink.on_checkpoint(saved)
                except StopTraining as stop:
                    return TrainResult(final_step=step, last_loss=last_loss, stopped=stop.reason)
            window_start += time.perf_counter() - save_start  # keep saving out of images/s

        # Sample grid from the EMA weights, with a fixed seed so grids compare over time.
        if sample_now:
            sample_start = time.perf_counter()
            drawn = draw_sample_grid(spec, unet, ema, step, checkpoint_dir / "samples", dev)
            # A checkpoint still being written is reported first: the sink hears of everything
            # in (step, checkpoint-before-sample) order, which is the order live watchers read.
            previous = writer.take()
            window_start += time.perf_counter() - sample_start  # keep sampling out of images/s
            try:
                if previous is not None:
                    sink.on_checkpoint(previous)
                sink.on_sample(drawn)
            except StopTraining as stop:
                return TrainResult(final_step=step, last_loss=last_loss, stopped=stop.reason)
        return None

    try:
        while step < cfg.steps:
            step += 1

            # Learning rate for this step.
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Batch: clean images, a timestep per image, Gaussian noise; x_t by eq. 4 of Ho et al. 2020.
            # Every rank draws the whole global batch's t and eps (the same numbers, same seed) and
            # keeps its share; one process keeps it all.
            x0 = to_model_range(images[ranks.share(batches.indices(step - 1))])  # (B/k, C, H, W) in [-1, 1]
            t = torch.randint(0, spec.diffusion.timesteps, (cfg.batch_size,), generator=noise, device=dev)  # (B,)
            eps = torch.randn((cfg.batch_size, *x0.shape[1:]), generator=noise, device=dev)  # (B, C, H, W)
            t, eps = ranks.share(t), ranks.share(eps)  # (B/k,), (B/k, C, H, W)
            x_t = schedule.add_noise(x0, eps, t).contiguous(memory_format=layout)  # (B, C, H, W)
            target = schedule.target(x0, eps, t)  # (B, C, H, W)

            # Forward / backward (compiled on CUDA; the first call compiles, and falls back to eager if that fails).
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's graph outputs are done with
            if compile_checked:
                loss = loss_of(x_t, t, target)
                loss.backward()
            else:
                try:
                    loss = loss_of(x_t, t, target)
                    loss.backward()
                except Exception as exc:
                    log.warning("torch.compile failed (%s: %s); training without compilation", type(exc).__name__, exc)
                    optimizer.zero_grad(set_to_none=True)
                    loss_of = forward_loss
                    loss = loss_of(x_t, t, target)
                    loss.backward()
                compile_checked = True
            loss = mean_over_ranks(loss) if distributed else loss.detach()  # the global batch's loss
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)

            # Update, unless the loss or gradient is NaN/inf: skipping keeps weights, optimizer moments
            # and EMA clean. No host read: the fused AdamW kernel skips itself when `found_inf` is 1
            # (and undoes its step count), the EMA update gets weight 0, and the streak of skipped
            # steps is checked at the next metric point or checkpoint.
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)  # 0-d bool, on the device
            skip.copy_(finite.logical_not())
            optimizer.step()
            ema_update.step(finite)
            window.add(step, loss, finite, max_nonfinite)
            optimizer.zero_grad(set_to_none=True)
            window_images += cfg.batch_size

            log_now = step % cfg.log_every == 0 or step == cfg.steps
            checkpoint_now = step % cfg.checkpoint_every == 0 or step == cfg.steps
            sample_now = cfg.sample_every > 0 and (step % cfg.sample_every == 0 or step == cfg.steps)
            if not (log_now or checkpoint_now or sample_now):
                continue
            values = window.read()  # SYNC (see _Window.read)
            if values.failed_at:
                raise NonFiniteLossError(
                    f"non-finite loss at step {values.failed_at} ({max_nonfinite} consecutive steps skipped; "
                    "lower training.learning_rate or training.grad_clip, or check the data)"
                )
            stopped = report(step, lr, values, log_now, checkpoint_now, sample_now) if ranks.is_main else None
            if distributed and agree_to_stop(stopped is not None, dev):  # SYNC: every rank leaves together
                return stopped or TrainResult(final_step=step, last_loss=None, stopped=StopReason.followed)
            if stopped is not None:
                return stopped
            if log_now and not ranks.is_main:
                window.start_next()
    finally:
        writer.close()

    return TrainResult(final_step=step, last_loss=last_loss)


class _CheckpointWriter:
    """Serialises and writes one checkpoint at a time on a background thread.

    The training thread hands over host copies of the tensors (`_snapshot`) and goes on training;
    `take()` waits for the write and returns what was written (re-raising a failed write), so the
    caller tells the sink only about whole files. A second `submit` waits for the first to be taken.
    """

    def __init__(self, checkpoint_dir: Path, config: dict[str, Any]) -> None:
        self.checkpoint_dir, self.config = checkpoint_dir, config
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future[SavedCheckpoint] | None = None

    def submit(self, snapshot: tuple[dict[str, torch.Tensor], TrainingState]) -> None:
        assert self._pending is None, "take() the previous checkpoint first"
        self._pending = self._pool.submit(self._write, *snapshot)

    def take(self) -> SavedCheckpoint | None:
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        """Wait for a write still running (so no file appears after `train` returns)."""
        self._pool.shutdown(wait=True)

    def _write(self, served: dict[str, torch.Tensor], state: TrainingState) -> SavedCheckpoint:
        written = write_checkpoint(self.checkpoint_dir, served_weights=served, unet_config=self.config, state=state)
        return SavedCheckpoint(
            step=state.step,
            path=written.path,
            sha256=written.sha256,
            size_bytes=written.size_bytes,
            state_path=written.state_path,
        )


# Periodic grids use DDIM (eta = 0) over this many steps: a few seconds, not T network calls.
SAMPLE_GRID_SAMPLER, SAMPLE_GRID_STEPS, SAMPLE_GRID_SEED = "ddim", 50, 0


def draw_sample_grid(
    spec: JobSpec, unet: torch.nn.Module, ema: EMAModel, step: int, out_dir: Path, dev: torch.device
) -> SavedSample:
    """A PNG grid of `sample_count` images drawn from the EMA weights. The copy of the network keeps
    training's modules and RNG untouched (a fresh U-Net would draw its init from the global RNG)."""
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


def ema_state_dict(unet: torch.nn.Module, ema: EMAModel) -> dict[str, torch.Tensor]:
    """The U-Net's state_dict with every parameter replaced by its EMA shadow (what is served)."""
    served = dict(unet.state_dict())
    served.update(zip((name for name, _ in unet.named_parameters()), ema.shadow_params, strict=True))
    return served


def _rng_states(noise: torch.Generator, dev: torch.device) -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state(), "noise": noise.get_state()}
    if dev.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(dev)  # dropout on the GPU draws from here
    return rng


def _host_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies on the host that training can no longer change (on CPU, `.to("cpu")` alone would alias)."""
    return {name: t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True) for name, t in tensors.items()}


def _snapshot(
    spec: JobSpec,
    step: int,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_update: _DeviceEMA,
    noise: torch.Generator,
    window: _Window,
    values: _WindowValues,
    dev: torch.device,
) -> tuple[dict[str, torch.Tensor], TrainingState]:
    """What a checkpoint writes (served EMA weights, training state), copied to the host."""
    # SYNC: copying the weights, optimizer moments and EMA to the host (and the EMA's update count).
    ema_update.sync_to_host()
    ema = ema_update.ema
    optimizer_state = optimizer.state_dict()  # references to the live moments: copied below
    ema_state = ema.state_dict()
    state = TrainingState(
        step=step,
        spec_json=spec.model_dump_json(),
        model=_host_copy(unet.state_dict()),
        optimizer={
            "state": {index: _host_copy(s) for index, s in optimizer_state["state"].items()},
            "param_groups": optimizer_state["param_groups"],
        },
        ema=ema_state | {"shadow_params": list(_host_copy(dict(enumerate(ema_state["shadow_params"]))).values())},
        rng=_rng_states(noise, dev),
        tensors=_host_copy({"loss_sum": window.loss_sum}),
        values={
            "loss_count": values.loss_count,
            "nonfinite_streak": values.nonfinite_streak,
            "nonfinite_total": values.nonfinite_total,
        },
    )
    return _host_copy(ema_state_dict(unet, ema)), state


# Spec fields that may change between a checkpoint and its resume: none of them changes what
# the next step computes (more steps extend a run; logging and checkpoint cadence are reporting).
_RESUMABLE_CHANGES = frozenset(
    {
        "name",
        "training.steps",
        "training.log_every",
        "training.checkpoint_every",
        "training.keep_checkpoints",
        "training.compile",  # the same computation, compiled or not
    }
)


def _flatten(spec: JobSpec) -> dict[str, Any]:
    """{"training.steps": 2000, "name": None, ...}: one entry per leaf field."""
    flat: dict[str, Any] = {}
    for section, values in spec.model_dump().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def _restore(
    weights: Path,
    spec: JobSpec,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMAModel,
    noise: torch.Generator,
    window: _Window,
    dev: torch.device,
) -> int:
    """Load the state saved beside `weights` into the freshly built objects; return its step."""
    state_path = state_path_for(weights)
    state = load_state(state_path)
    saved, now = _flatten(JobSpec.model_validate_json(state.spec_json)), _flatten(spec)
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in _RESUMABLE_CHANGES)
    if changed:
        raise ValueError(f"cannot resume from {state_path}: the spec differs in {', '.join(changed)}")

    unet.load_state_dict(state.model)
    # Keep this run's implementation flags (fused on CUDA, not on CPU); restore the rest.
    flags = ("fused", "foreach", "capturable", "differentiable")
    groups = [
        saved_group | {k: group[k] for k in flags if k in group}
        for saved_group, group in zip(state.optimizer["param_groups"], optimizer.param_groups, strict=True)
    ]
    optimizer.load_state_dict({"state": state.optimizer["state"], "param_groups": groups})  # moves state to dev
    ema.load_state_dict(state.ema)
    ema.to(dev)
    params = list(unet.parameters())
    ema.shadow_params = [_like(shadow, param) for shadow, param in zip(ema.shadow_params, params, strict=True)]
    for param in params:  # fused AdamW wants the moments in the parameters' memory format
        moments = optimizer.state[param]
        moments.update({k: _like(v, param) for k, v in moments.items() if k != "step"})

    torch.set_rng_state(state.rng["torch"])
    if dev.type == "cuda" and "cuda" in state.rng:
        torch.cuda.set_rng_state(state.rng["cuda"], dev)
    noise.set_state(state.rng["noise"])

    window.restore(state.tensors["loss_sum"], state.values)
    return state.step


def _like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`tensor` (loaded contiguous) in `param`'s memory format (channels_last on CUDA)."""
    return torch.empty_like(param).copy_(tensor)
