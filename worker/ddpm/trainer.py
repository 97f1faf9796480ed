"""The DDPM training loop, readable top to bottom.

One step: learning rate -> batch (x0, t, eps) -> x_t -> U-Net forward -> MSE to the target ->
backward -> clip -> optimizer step -> zero_grad -> EMA update -> (every log_every) metric point
-> (every checkpoint_every, and at the end) checkpoint. Progress leaves through a `TrainingSink`,
so this module knows nothing about databases or queues.

Every CPU-GPU synchronisation is marked with ``# SYNC``: they decide the speed on a GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from app.spec import JobSpec, TrainingSpec
from worker.ddpm.checkpoint import TrainingState, load_state, state_path_for, write_checkpoint
from worker.ddpm.data import BatchIndexer, load_images, to_model_range
from worker.ddpm.model import build_unet, unet_config
from worker.ddpm.schedule import NoiseSchedule

# EMA warm-up (diffusers EMAModel, use_ema_warmup): decay_k = min(ema_decay, 1 - (1 + k)^-power).
# power 3/4 suits runs of up to ~100k steps (0.999 reached at 10k steps); it is what diffusers'
# unconditional training example uses.
EMA_POWER = 0.75


@dataclass(frozen=True)
class MetricPoint:
    step: int
    loss: float  # mean over the (finite) steps since the previous point; NaN if every one was skipped
    lr: float
    images_per_s: float


@dataclass(frozen=True)
class SavedCheckpoint:
    step: int
    path: Path  # served weights, step-XXXXXXXX.safetensors
    sha256: str  # of `path`
    size_bytes: int  # of `path`
    state_path: Path  # step-XXXXXXXX.state.safetensors (resume only; never served)


class StopTraining(Exception):
    """Raised by a sink to stop the loop (cancel, lost lease, worker shutdown).

    With `checkpoint=True` (a graceful shutdown) the loop first saves a checkpoint of the step
    it stopped at, so the next attempt resumes there; otherwise nothing more is saved.
    """

    def __init__(self, reason: str = "", *, checkpoint: bool = False) -> None:
        super().__init__(reason)
        self.checkpoint = checkpoint


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient; training cannot go on."""


class TrainingSink(Protocol):
    def on_log(self, point: MetricPoint) -> None: ...  # may raise StopTraining

    def on_checkpoint(self, saved: SavedCheckpoint) -> None: ...  # may raise StopTraining


@dataclass(frozen=True)
class TrainResult:
    final_step: int
    last_loss: float | None
    stopped: bool


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


@dataclass
class _Window:
    """What the loop accumulates between metric points (saved with the state, for exact resume)."""

    loss_sum: torch.Tensor  # 0-d, on the device: summing there avoids a sync per step
    loss_count: int = 0
    nonfinite_streak: int = 0
    nonfinite_total: int = 0


def train(
    spec: JobSpec,
    checkpoint_dir: Path,
    sink: TrainingSink,
    *,
    resume_from: Path | None = None,
    device: str | None = None,
    max_nonfinite: int = 5,
) -> TrainResult:
    """Train (or continue training) the job's U-Net; see the module docstring for one step.

    `resume_from` is a served weights file ``step-XXXXXXXX.safetensors``; its sibling
    ``.state.safetensors`` restores weights, optimizer, EMA and RNGs, and training continues at
    the next step exactly as if it had never stopped.
    """
    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    cfg = spec.training
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

    # Data: the whole set on the device as uint8; a batch is an index gather, no host copy.
    images = load_images(spec.dataset).to(dev)  # (N, C, H, W) uint8
    batches = BatchIndexer(len(images), cfg.batch_size, derive_seed(cfg.seed, "batches"), dev)
    schedule = NoiseSchedule(spec.diffusion).to(dev)

    # Model, optimizer, EMA, noise generator.
    torch.manual_seed(cfg.seed)
    unet = build_unet(spec).to(dev).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=on_cuda)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=EMA_POWER, foreach=True)
    noise = torch.Generator(dev).manual_seed(derive_seed(cfg.seed, "noise"))  # draws t and eps
    window = _Window(loss_sum=torch.zeros((), device=dev))
    step = 0  # optimizer steps done so far
    if resume_from is not None:
        step = _restore(Path(resume_from), spec, unet, optimizer, ema, noise, window, dev)

    # bf16 autocast for the forward pass on CUDA; the loss is computed in fp32. CPU stays fp32.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    last_loss: float | None = None
    window_start, window_images = time.perf_counter(), 0

    while step < cfg.steps:
        step += 1

        # Learning rate for this step.
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Batch: clean images, a timestep per image, Gaussian noise; x_t by eq. 4 of Ho et al. 2020.
        x0 = to_model_range(images[batches.indices(step - 1)])  # (B, C, H, W) in [-1, 1]
        t = torch.randint(0, spec.diffusion.timesteps, (x0.shape[0],), generator=noise, device=dev)  # (B,)
        eps = torch.randn(x0.shape, generator=noise, device=dev)  # (B, C, H, W)
        x_t = schedule.add_noise(x0, eps, t)  # (B, C, H, W)

        # Forward / backward.
        with autocast:
            prediction = unet(x_t, t).sample  # (B, C, H, W)
        loss = F.mse_loss(prediction.float(), schedule.target(x0, eps, t))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)

        # Update, unless the loss or gradient is NaN/inf: skipping keeps weights, optimizer moments
        # and EMA clean. SYNC: one host read per step; the only way to skip AdamW's update exactly
        # (zeroed gradients would still move the weights through the moments).
        if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            optimizer.step()
            ema.step(unet.parameters())
            window.loss_sum += loss.detach()
            window.loss_count += 1
            window.nonfinite_streak = 0
        else:
            window.nonfinite_streak += 1
            window.nonfinite_total += 1
            if window.nonfinite_streak >= max_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} ({window.nonfinite_streak} consecutive steps skipped; "
                    "lower training.learning_rate or training.grad_clip, or check the data)"
                )
        optimizer.zero_grad(set_to_none=True)
        window_images += x0.shape[0]

        # Metric point.
        if step % cfg.log_every == 0 or step == cfg.steps:
            # SYNC: reading the accumulated loss waits for the device to finish the window.
            mean = (window.loss_sum / window.loss_count).item() if window.loss_count else float("nan")
            now = time.perf_counter()
            point = MetricPoint(step=step, loss=mean, lr=lr, images_per_s=window_images / (now - window_start))
            window.loss_sum.zero_()
            window.loss_count = 0
            window_start, window_images = now, 0
            last_loss = mean
            try:
                sink.on_log(point)
            except StopTraining as stop:
                if stop.checkpoint:
                    saved = _save(checkpoint_dir, spec, step, unet, optimizer, ema, noise, window, dev)
                    with contextlib.suppress(StopTraining):
                        sink.on_checkpoint(saved)
                return TrainResult(final_step=step, last_loss=last_loss, stopped=True)

        # Checkpoint.
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_start = time.perf_counter()
            saved = _save(checkpoint_dir, spec, step, unet, optimizer, ema, noise, window, dev)
            window_start += time.perf_counter() - save_start  # keep saving out of images/s
            try:
                sink.on_checkpoint(saved)
            except StopTraining:
                return TrainResult(final_step=step, last_loss=last_loss, stopped=True)

    return TrainResult(final_step=step, last_loss=last_loss, stopped=False)


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


def _save(
    checkpoint_dir: Path,
    spec: JobSpec,
    step: int,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMAModel,
    noise: torch.Generator,
    window: _Window,
    dev: torch.device,
) -> SavedCheckpoint:
    # SYNC: copying the weights and optimizer state to the host.
    state = TrainingState(
        step=step,
        spec_json=spec.model_dump_json(),
        model=unet.state_dict(),
        optimizer=optimizer.state_dict(),
        ema=ema.state_dict(),
        rng=_rng_states(noise, dev),
        tensors={"loss_sum": window.loss_sum},
        values={
            "loss_count": window.loss_count,
            "nonfinite_streak": window.nonfinite_streak,
            "nonfinite_total": window.nonfinite_total,
        },
    )
    written = write_checkpoint(
        checkpoint_dir, served_weights=ema_state_dict(unet, ema), unet_config=unet_config(spec), state=state
    )
    return SavedCheckpoint(
        step=step,
        path=written.path,
        sha256=written.sha256,
        size_bytes=written.size_bytes,
        state_path=written.state_path,
    )


# Spec fields that may change between a checkpoint and its resume: none of them changes what
# the next step computes (more steps extend a run; logging and checkpoint cadence are reporting).
_RESUMABLE_CHANGES = frozenset(
    {"name", "training.steps", "training.log_every", "training.checkpoint_every", "training.keep_checkpoints"}
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

    torch.set_rng_state(state.rng["torch"])
    if dev.type == "cuda" and "cuda" in state.rng:
        torch.cuda.set_rng_state(state.rng["cuda"], dev)
    noise.set_state(state.rng["noise"])

    window.loss_sum.copy_(state.tensors["loss_sum"])
    window.loss_count = state.values["loss_count"]
    window.nonfinite_streak = state.values["nonfinite_streak"]
    window.nonfinite_total = state.values["nonfinite_total"]
    return state.step
