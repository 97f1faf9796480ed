"""How the training loop reports progress: the sink protocol and what travels through it.

No torch here: the worker's database sink, the CLI and the tests type against these names
without loading the ML stack. The loop (worker/ddpm/trainer.py) calls the sink at each report
step, in step order: a checkpoint is reported before any newer metric point, checkpoint or
sample grid; an evaluation comes after the checkpoint and grid of its step. A sink stops the
loop by raising `StopTraining` with the reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# The metric point's loss per timestep range: t in [0, T) cut into this many equal buckets.
LOSS_BUCKETS = 10


@dataclass(frozen=True)
class MetricPoint:
    step: int
    loss: float  # mean over the (finite) steps since the previous point; NaN if every one was skipped
    lr: float
    images_per_s: float
    # The mean unweighted per-image loss (MSE to the target) of the images whose t fell in each of
    # LOSS_BUCKETS equal ranges of [0, T), over the same steps as `loss`; None where none fell.
    # Empty when the loop does not measure it.
    loss_by_t: tuple[float | None, ...] = ()
    # Model FLOP utilisation over the window: images/s x the training FLOPs of one image (forward and
    # backward, counted once with torch.utils.flop_counter) / the device's dense bf16 peak. None where
    # the peak is not known (the CPU, an unlisted GPU without DDPM_PEAK_TFLOPS).
    mfu: float | None = None
    # The most GPU memory the run's tensors have held since the attempt began
    # (torch.cuda.max_memory_allocated); None on the CPU.
    peak_memory_bytes: int | None = None


@dataclass(frozen=True)
class EvaluationPoint:
    """FID and KID of `samples` images drawn from the EMA weights at `step`, against the training set."""

    step: int
    fid: float
    kid: float  # unbiased MMD^2 with the cubic polynomial kernel, mean over subsets
    kid_std: float  # its standard deviation over the subsets
    samples: int  # images drawn
    reference_images: int  # training images the reference statistics were computed from
    feature_network: str  # "inception-v3", "digits-classifier", ... (what the features are)
    seconds: float  # wall time of drawing and measuring (kept out of images/s)


@dataclass(frozen=True)
class SavedCheckpoint:
    step: int
    path: Path  # served weights, step-XXXXXXXX.safetensors
    sha256: str  # of `path`
    size_bytes: int  # of `path`
    state_path: Path  # step-XXXXXXXX.state.safetensors (resume only; never served)
    write_s: float = 0.0  # from the snapshot handed to the writer to both files written


@dataclass(frozen=True)
class SavedSample:
    step: int
    path: Path  # a PNG grid, samples/step-XXXXXXXX.png beside the checkpoints
    sha256: str
    size_bytes: int


class EventKind(enum.StrEnum):
    """What happened to a run that its owner should know of: kept on the job (GET
    /v1/jobs/{id}/training-events) and sent live as the event stream's `training_event`."""

    oom_halved = "oom_halved"  # a step ran out of GPU memory and was redone with the micro-batch halved
    compile_failed = "compile_failed"  # torch.compile failed: the job trains eagerly
    graphs_failed = "graphs_failed"  # capturing the step as a CUDA graph failed: the job trains compiled, step by step


@dataclass(frozen=True)
class TrainingEvent:
    step: int  # the step it happened at (1-based; the step that was redone, for oom_halved)
    kind: EventKind
    message: str  # one line for people
    # Facts for programs: oom_halved {"micro_batch": new, "was": old, "batch": per-GPU batch};
    # compile_failed / graphs_failed {"error": "<type>: <message>"}.
    detail: dict[str, int | str]


class StopReason(enum.StrEnum):
    """Why a sink stopped the loop; the worker decides the job's next status from it."""

    cancelled = "cancelled"  # the user asked: checkpoint this step, then the job ends cancelled
    fenced = "fenced"  # a newer attempt owns the job: write nothing more
    shutdown = "shutdown"  # the worker is stopping: checkpoint this step, then back to the queue
    lease_lost = "lease_lost"  # the lease could not be renewed: a new attempt resumes the job
    storage_unavailable = "storage_unavailable"  # a checkpoint could not be stored: as lease_lost
    followed = "followed"  # a rank other than 0 leaving with rank 0 (a multi-GPU job)

    @property
    def checkpoint_first(self) -> bool:
        """Whether the loop saves a checkpoint of the step it stops at before it returns: a job
        stopped by its user or by a shutdown keeps what it trained (to sample, export or resume)."""
        return self in (StopReason.shutdown, StopReason.cancelled)


class StopTraining(Exception):
    """Raised by a sink to stop the loop; `reason` says why, `detail` is for the log."""

    def __init__(self, reason: StopReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason


class TrainingSink(Protocol):
    """Where the loop's progress goes. Each call may raise `StopTraining`."""

    def on_log(self, point: MetricPoint) -> None: ...

    def on_checkpoint(self, saved: SavedCheckpoint) -> None: ...

    def on_sample(self, saved: SavedSample) -> None: ...

    def on_evaluation(self, point: EvaluationPoint) -> None: ...

    def on_event(self, event: TrainingEvent) -> None: ...


class NullSink:
    """A sink that keeps nothing: ranks other than 0 of a multi-GPU job report through rank 0."""

    def on_log(self, point: MetricPoint) -> None:
        pass

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        pass

    def on_sample(self, saved: SavedSample) -> None:
        pass

    def on_evaluation(self, point: EvaluationPoint) -> None:
        pass

    def on_event(self, event: TrainingEvent) -> None:
        pass


@dataclass(frozen=True)
class TrainResult:
    final_step: int
    last_loss: float | None
    stopped: StopReason | None = None  # None: the run reached training.steps
