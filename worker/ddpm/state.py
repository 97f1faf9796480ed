"""What a training run holds between steps, and how a checkpoint saves and restores it.

`LiveState` is the live side of `worker.ddpm.checkpoint.TrainingState` (the on-disk format): the
U-Net (under DistributedDataParallel in a multi-GPU job), fused AdamW with its `found_inf` skip
flag, the EMA of the weights, the generator that draws each step's t and eps, and the metric
window. `LiveState.build` makes a fresh run or resumes one; `snapshot()` copies the state to the
host for the checkpoint writer; `restore()` loads a saved state, after which the next step is
exactly the one that would have followed (same random draws, bit-identical tensors).

Everything a step touches stays on the device, so a step never waits for the host; the reads that
do wait are marked ``# SYNC``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from torch.nn.parallel import DistributedDataParallel

from app.model_shape import shape_differences
from app.spec import JobSpec
from worker.ddpm.checkpoint import TrainingState, load_state, state_path_for
from worker.ddpm.distributed import DDP_OPTIONS, Ranks, sum_over_ranks
from worker.ddpm.model import build_unet
from worker.ddpm.sink import LOSS_BUCKETS

# EMA warm-up (diffusers EMAModel, use_ema_warmup): decay_k = min(ema_decay, 1 - (1 + k)^-power).
# power 3/4 suits runs of up to ~100k steps (0.999 reached at 10k steps); it is what diffusers'
# unconditional training example uses.
EMA_POWER = 0.75


def derive_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed per random stream, so weights, batches and noise never share one."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class Window:
    """What the loop accumulates between metric points, kept on the device so that a step never
    waits for the host; read once per metric point or checkpoint (and saved with the state, for
    exact resume).

    `loss_by_t` is the loss per range of timesteps: for each of LOSS_BUCKETS equal ranges of
    [0, T) (image i falls in bucket t_i * LOSS_BUCKETS // T), the sum of the unweighted per-image
    losses of the finite steps and how many images that was. In a multi-GPU job each rank counts
    its own share of every batch, and `read` sums them over the ranks; rank 0 then keeps the job's
    totals and the others start again from zero. So what rank 0 checkpoints is the whole window so
    far, and a resumed run (rank 0 restores the totals, the others zeros) adds up exactly as the
    uninterrupted one would have.
    """

    def __init__(self, dev: torch.device, timesteps: int, ranks: Ranks | None = None) -> None:
        self.loss_sum = torch.zeros((), device=dev)  # sum of the finite losses since the last point
        self.loss_count = torch.zeros((), dtype=torch.int64, device=dev)  # finite steps since the last point
        self.nonfinite_streak = torch.zeros((), dtype=torch.int64, device=dev)  # consecutive skipped steps
        self.nonfinite_total = torch.zeros((), dtype=torch.int64, device=dev)
        self.failed_at = torch.zeros((), dtype=torch.int64, device=dev)  # step the streak hit the limit; 0: never
        # Per bucket of t: [sum of per-image losses, image count]. float64: counts stay exact.
        self.loss_by_t = torch.zeros((2, LOSS_BUCKETS), dtype=torch.float64, device=dev)
        self.timesteps, self.ranks = timesteps, ranks  # ranks: None in a single-process job
        self._bucket_ids = torch.arange(LOSS_BUCKETS, device=dev)  # (LOSS_BUCKETS,)

    def add(
        self,
        step: torch.Tensor,
        loss: torch.Tensor,
        finite: torch.Tensor,
        max_nonfinite: int,
        t: torch.Tensor,
        image_losses: torch.Tensor,
    ) -> None:
        """Count one step (`step`: its number, a 0-d int64 on the device, so that a captured step
        reads the current one); `finite` (0-d bool) says whether its update was applied. `t` and
        `image_losses` ((B,) each) are this rank's images' timesteps and unweighted losses."""
        self.loss_sum.add_(torch.where(finite, loss, 0.0))
        self.loss_count.add_(finite)
        self.nonfinite_streak.add_(1).mul_(finite.logical_not())
        self.nonfinite_total.add_(finite.logical_not())
        # torch.where, not masked_fill_: a tensor fill value is read on the host.
        failed_now = (self.nonfinite_streak >= max_nonfinite) & (self.failed_at == 0)
        self.failed_at.copy_(torch.where(failed_now, step, self.failed_at))
        # A one-hot sum rather than index_add_/bincount: those add with atomics on CUDA (an order
        # that varies from run to run); this reduction is deterministic, and B x LOSS_BUCKETS is small.
        in_bucket = (t * LOSS_BUCKETS // self.timesteps)[:, None] == self._bucket_ids  # (B, LOSS_BUCKETS) bool
        counted = (in_bucket & finite).double()  # (B, LOSS_BUCKETS); nothing from a skipped step
        kept = torch.where(finite, image_losses, 0.0).double()[:, None]  # (B, 1): a skipped step's NaN * 0 is NaN
        self.loss_by_t.add_(torch.stack([(counted * kept).sum(0), counted.sum(0)]))  # (2, LOSS_BUCKETS)

    def read(self) -> WindowValues:
        # SYNC: one host read of the window's accumulators (waits for the device to finish the window).
        mean = self.loss_sum / self.loss_count  # NaN when every step of the window was skipped
        counters = (self.loss_count, self.nonfinite_streak, self.nonfinite_total, self.failed_at)
        scalars = torch.stack([mean.double(), *(c.double() for c in counters)])
        mean_value, *rest = torch.cat([scalars, self._loss_by_t_of_the_job().flatten()]).tolist()
        count, streak, total, failed_at = (int(v) for v in rest[:4])
        sums, counts = rest[4 : 4 + LOSS_BUCKETS], rest[4 + LOSS_BUCKETS :]
        by_t = tuple(s / c if c else None for s, c in zip(sums, counts, strict=True))
        return WindowValues(mean_value, count, streak, total, failed_at, by_t)

    def _loss_by_t_of_the_job(self) -> torch.Tensor:
        """`loss_by_t` summed over the ranks (every rank calls `read` at the same steps); rank 0 keeps
        the totals, the others zeros. No host sync."""
        if self.ranks is None:
            return self.loss_by_t
        total = sum_over_ranks(self.loss_by_t)
        if self.ranks.is_main:
            self.loss_by_t.copy_(total)
        else:
            self.loss_by_t.zero_()
        return total

    def start_next(self, values: WindowValues) -> WindowValues:
        """Begin a new metric window; returns `values` as they read now (no loss summed yet)."""
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.loss_by_t.zero_()
        return WindowValues(float("nan"), 0, values.nonfinite_streak, values.nonfinite_total, 0, NO_LOSS_BY_T)

    def tensors(self) -> list[torch.Tensor]:
        """Every accumulator a step changes."""
        counters = [self.loss_count, self.nonfinite_streak, self.nonfinite_total, self.failed_at]
        return [self.loss_sum, *counters, self.loss_by_t]

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The accumulators a checkpoint keeps (on rank 0, after `read`: the whole job's)."""
        return {"loss_sum": self.loss_sum, "loss_by_t": self.loss_by_t}

    def restore(self, tensors: dict[str, torch.Tensor], values: dict[str, int]) -> None:
        self.loss_sum.copy_(tensors["loss_sum"])
        self.loss_count.fill_(values["loss_count"])
        self.nonfinite_streak.fill_(values["nonfinite_streak"])
        self.nonfinite_total.fill_(values["nonfinite_total"])
        # Checkpoints from before loss_by_t have none: the window's buckets start from zero.
        if "loss_by_t" in tensors and (self.ranks is None or self.ranks.is_main):
            self.loss_by_t.copy_(tensors["loss_by_t"])


NO_LOSS_BY_T: tuple[float | None, ...] = (None,) * LOSS_BUCKETS


@dataclass(frozen=True)
class WindowValues:
    mean_loss: float
    loss_count: int
    nonfinite_streak: int
    nonfinite_total: int
    failed_at: int  # 0 unless the streak of skipped steps reached max_nonfinite
    loss_by_t: tuple[float | None, ...] = NO_LOSS_BY_T  # mean unweighted loss per bucket of t; None: no image


class DeviceEMA:
    """diffusers' `EMAModel` update, with the update count on the device.

    A skipped (non-finite) step must not advance the EMA; keeping the count on the device lets the
    update be masked (weight 0) instead of branched on with a host read. The decay follows
    EMAModel.get_decay with use_ema_warmup: 0 for the first update, then min(ema_decay,
    1 - k^-power) for the k-th. `ema_model` stays the state's container, so checkpoints keep
    EMAModel's state_dict format.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float, dev: torch.device) -> None:
        self.ema_model = EMAModel(params, decay=decay, use_ema_warmup=True, power=EMA_POWER, foreach=True)
        self.params, self.decay, self.dev = params, decay, dev
        self.updates = torch.full((), float(self.ema_model.optimization_step), dtype=torch.float64, device=dev)

    @torch.no_grad()
    def step(self, finite: torch.Tensor) -> None:
        self.updates.add_(finite)  # k, this update included when it applies
        warm = self.updates - 1  # EMAModel: step = optimization_step - 1
        decay = torch.where(warm > 0, (1 - (1 + warm) ** -EMA_POWER).clamp(max=self.decay), 0.0)
        weight = ((1 - decay) * finite).float()  # 0 for a skipped step: the shadow stays exactly as it was
        delta = torch._foreach_sub(self.params, self.ema_model.shadow_params)  # p - s
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(self.ema_model.shadow_params, delta)  # s + w (p - s)

    def state_dict(self) -> dict[str, Any]:
        # SYNC: the update count, for EMAModel's state_dict (checkpoints only).
        self.ema_model.optimization_step = int(self.updates.item())
        return self.ema_model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema_model.load_state_dict(state)
        self.ema_model.to(self.dev)
        self.ema_model.shadow_params = [
            _like(shadow, param) for shadow, param in zip(self.ema_model.shadow_params, self.params, strict=True)
        ]
        self.updates.fill_(float(self.ema_model.optimization_step))


@dataclass
class LiveState:
    """One run's training state on the device: what a step changes and a checkpoint saves."""

    spec: JobSpec
    dev: torch.device
    unet: torch.nn.Module  # the network whose weights checkpoints save
    model: torch.nn.Module  # what the step calls: `unet`, or `unet` under DistributedDataParallel
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    skip: torch.Tensor  # the optimizer's `found_inf`: 1.0 while the current step's loss or gradient is NaN/inf
    ema: DeviceEMA
    noise: torch.Generator  # draws every step's t and eps
    window: Window
    micro_batch: int  # images per forward/backward pass (training.micro_batch, or halved after running out of memory)
    start_step: int = 0  # optimizer steps already done: 0, or the step of the checkpoint resumed from

    @classmethod
    def build(
        cls,
        spec: JobSpec,
        dev: torch.device,
        layout: torch.memory_format,
        *,
        ranks: Ranks,
        distributed: bool,
        resume_from: Path | None,
        init_from: Path | None = None,
        capturable: bool = False,
    ) -> LiveState:
        """A fresh run from `training.seed` (starting from `init_from`'s weights for a fine-tune),
        or the run saved beside `resume_from` (a served ``step-XXXXXXXX.safetensors``); with
        `distributed`, the U-Net under DistributedDataParallel.

        Fused AdamW (CPU and CUDA): one kernel per step, and its `found_inf` input skips a
        non-finite step on the device, without a host branch. `capturable` (a step replayed as a
        CUDA graph): AdamW's capturable mode, with the learning rate a device tensor the graph reads
        (`set_learning_rate` fills it).
        """
        cfg = spec.training
        torch.manual_seed(cfg.seed)
        unet = build_unet(spec).to(dev, memory_format=layout).train()
        params = list(unet.parameters())
        # fp32 on the device: what the fused CUDA kernel reads a tensor learning rate as.
        lr = torch.tensor(cfg.learning_rate, dtype=torch.float32, device=dev) if capturable else cfg.learning_rate
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True, capturable=capturable)
        skip = torch.zeros((), device=dev)
        optimizer.found_inf = skip  # read by AdamW.step(): the fused kernel leaves everything as it was
        state = cls(
            spec=spec,
            dev=dev,
            unet=unet,
            model=unet,
            params=params,
            optimizer=optimizer,
            skip=skip,
            ema=DeviceEMA(params, cfg.ema_decay, dev),
            noise=torch.Generator(dev).manual_seed(derive_seed(cfg.seed, "noise")),
            window=Window(dev, spec.diffusion.timesteps, ranks if distributed else None),
            micro_batch=cfg.micro_batch or cfg.batch_size // ranks.world_size,
        )
        if resume_from is not None:
            state.start_step = state.restore(Path(resume_from))
        elif init_from is not None:
            state.start_from(Path(init_from))
        if not ranks.is_main:
            # Dropout draws from the global RNG: other ranks draw other masks (rank 0 keeps the
            # single-process stream, which is what the checkpoint saves), reproducibly per resume step.
            torch.manual_seed(derive_seed(cfg.seed, f"rank-{ranks.rank}-from-{state.start_step}"))
        if distributed:
            # DDP broadcasts rank 0's weights at construction and averages gradients in backward.
            state.model = DistributedDataParallel(unet, **DDP_OPTIONS)
        return state

    def step_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step changes in place: weights, AdamW's moments and step counts, the EMA, the
        skip flag, the metric window (what checking a captured step compares)."""
        moments = [v for p in self.params for v in self.optimizer.state[p].values() if isinstance(v, torch.Tensor)]
        ema = [*self.ema.ema_model.shadow_params, self.ema.updates]
        return [*self.params, *moments, *ema, self.skip, *self.window.tensors()]

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # in place: a captured step reads this tensor
            else:
                group["lr"] = lr

    def snapshot(self, step: int, values: WindowValues) -> tuple[dict[str, torch.Tensor], TrainingState]:
        """What a checkpoint of `step` writes (served EMA weights, training state), copied to the host."""
        # SYNC: copying the weights, optimizer moments and EMA to the host (and the EMA's update count).
        optimizer_state = self.optimizer.state_dict()  # references to the live moments: copied below
        ema_state = self.ema.state_dict()
        state = TrainingState(
            step=step,
            spec_json=self.spec.model_dump_json(),
            model=_host_copy(self.unet.state_dict()),
            optimizer={
                "state": {index: _host_copy(s) for index, s in optimizer_state["state"].items()},
                "param_groups": [_with_float_lr(group) for group in optimizer_state["param_groups"]],
            },
            ema=ema_state | {"shadow_params": list(_host_copy(dict(enumerate(ema_state["shadow_params"]))).values())},
            rng=self._rng_states(),
            tensors=_host_copy(self.window.saved_tensors()),
            values={
                "loss_count": values.loss_count,
                "nonfinite_streak": values.nonfinite_streak,
                "nonfinite_total": values.nonfinite_total,
                "micro_batch": self.micro_batch,
            },
        )
        return _host_copy(ema_state_dict(self.unet, self.ema.ema_model)), state

    def restore(self, weights: Path) -> int:
        """Load the state saved beside `weights` into this freshly built run; return its step."""
        state_path = state_path_for(weights)
        saved = load_state(state_path)
        _check_resumable(JobSpec.model_validate_json(saved.spec_json), self.spec, state_path)

        self.unet.load_state_dict(saved.model)
        # Keep this run's implementation flags (fused, capturable) and its learning rate (a tensor a
        # captured step reads, when capturable; set every step anyway); restore the rest.
        flags = ("fused", "foreach", "capturable", "differentiable", "lr")
        groups = [
            saved_group | {k: group[k] for k in flags if k in group}
            for saved_group, group in zip(saved.optimizer["param_groups"], self.optimizer.param_groups, strict=True)
        ]
        self.optimizer.load_state_dict({"state": saved.optimizer["state"], "param_groups": groups})  # moves to dev
        self.ema.load_state_dict(saved.ema)
        for param in self.params:  # fused AdamW wants the moments in the parameters' memory format
            moments = self.optimizer.state[param]
            moments.update({k: _like(v, param) for k, v in moments.items() if k != "step"})

        torch.set_rng_state(saved.rng["torch"])
        if self.dev.type == "cuda" and "cuda" in saved.rng:
            torch.cuda.set_rng_state(saved.rng["cuda"], self.dev)
        self.noise.set_state(saved.rng["noise"])

        self.window.restore(saved.tensors, saved.values)
        # Go on with the micro-batch the run had come down to (checkpoints before micro-batches have none).
        self.micro_batch = min(self.micro_batch, saved.values.get("micro_batch", self.micro_batch))
        return saved.step

    def start_from(self, state_path: Path) -> None:
        """A fine-tune: the raw and EMA weights of another run's checkpoint (`state_path`, its
        ``.state.safetensors``), into this freshly built run, which keeps its own optimizer (fresh),
        seed, RNG streams and step 0. The EMA goes on from the source's (its update count too, so
        its warm-up is not redone: a fresh warm-up would replace it by the raw weights at the first
        step), with this spec's ema_decay."""
        saved = load_state(state_path)
        differences = shape_differences(JobSpec.model_validate_json(saved.spec_json), self.spec)
        if differences:
            raise ValueError(f"cannot start from {state_path}: {'; '.join(differences)}")
        self.unet.load_state_dict(saved.model)  # copies into the parameters, keeping their memory format
        self.ema.load_state_dict(saved.ema | {"decay": self.spec.training.ema_decay})

    def _rng_states(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state(), "noise": self.noise.get_state()}
        if self.dev.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.dev)  # dropout on the GPU draws from here
        return rng


def _with_float_lr(group: dict[str, Any]) -> dict[str, Any]:
    """A param group as checkpoints save it: a tensor learning rate (capturable) as a number."""
    lr = group["lr"]
    return group | {"lr": float(lr.item())} if isinstance(lr, torch.Tensor) else group  # SYNC (checkpoints only)


def ema_state_dict(unet: torch.nn.Module, ema: EMAModel) -> dict[str, torch.Tensor]:
    """The U-Net's state_dict with every parameter replaced by its EMA shadow (what is served)."""
    served = dict(unet.state_dict())
    served.update(zip((name for name, _ in unet.named_parameters()), ema.shadow_params, strict=True))
    return served


def _host_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies on the host that training can no longer change (on CPU, `.to("cpu")` alone would alias)."""
    return {name: t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True) for name, t in tensors.items()}


def _like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`tensor` (loaded contiguous) in `param`'s memory format (channels_last on CUDA)."""
    return torch.empty_like(param).copy_(tensor)


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
        "training.micro_batch",  # the same gradient, summed in parts (a run may halve it itself)
        "training.on_oom",
    }
)


def _check_resumable(saved: JobSpec, now: JobSpec, state_path: Path) -> None:
    """Refuse to resume under a spec that would compute the next step differently."""
    before, after = _flatten(saved), _flatten(now)
    changed = sorted(
        k for k in before.keys() | after.keys() if before.get(k) != after.get(k) and k not in _RESUMABLE_CHANGES
    )
    if changed:
        raise ValueError(f"cannot resume from {state_path}: the spec differs in {', '.join(changed)}")


def _flatten(spec: JobSpec) -> dict[str, Any]:
    """{"training.steps": 2000, "name": None, ...}: one entry per leaf field."""
    flat: dict[str, Any] = {}
    for section, values in spec.model_dump().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat
