"""One optimizer step, and how it is made fast: micro-batches, the out-of-memory policy,
compilation, and the whole step replayed as one CUDA graph.

`TrainStep(step, x_t, t, target)` does, for one drawn batch (this rank's share of it):
forward and backward over its micro-batches (their gradients add up to the whole batch's) ->
the loss averaged over the ranks -> clipping -> the NaN/inf skip flag -> fused AdamW -> the EMA
update -> the metric window. How it runs is `step_plan(training.compile, device, distributed)`:

- `eager`;
- `compiled`: the forward pass and loss `torch.compile`d. The first call is checked: if
  compilation fails, the step is redone eagerly and the job trains eagerly from then on;
- `captured` (single-GPU CUDA): compiled, and after `WARMUP_STEPS` steps run as usual (on a side
  stream, as CUDA graphs require: the optimizer's state, cuDNN's choices and the compiled code are
  made there), the whole step is captured once as a CUDA graph; every later step is three copies
  into the graph's input tensors and one replay, so a small network's step costs its kernels, not
  Python. Everything that changes from step to step is a device tensor the graph reads (the learning
  rate, the step number, the batch); nothing in the step reads the host. If capturing fails, the
  job goes on compiled, step by step.
Each fallback is a `TrainingEvent` for the job.

Out of memory (`torch.cuda.OutOfMemoryError`) while computing the gradients: with
`training.on_oom: halve` the step's partial gradients are dropped and the same batch is redone with
the micro-batch halved, down to 1 image; the batch, and so the run's maths, stay the same (the
micro-batch losses are weighted by their share of the batch, so the gradient is the whole batch's
whatever the split). The micro-batch in use is saved with checkpoints, so a resumed run goes on with
it. A multi-GPU job cannot redo a step on one rank alone: it fails, naming `training.micro_batch`.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from app.spec import TrainingSpec
from worker.ddpm.distributed import mean_over_ranks
from worker.ddpm.schedule import NoiseSchedule
from worker.ddpm.sink import EventKind, TrainingEvent
from worker.ddpm.state import LiveState

log = logging.getLogger(__name__)

# Steps run as usual before the whole step is captured: the first one creates the optimizer's
# moments and compiles; the next ones let cuDNN and the caching allocator settle.
WARMUP_STEPS = 3


class StepPlan(enum.StrEnum):
    eager = "eager"
    compiled = "compiled"
    captured = "captured"


def step_plan(compile_setting: str, dev: torch.device, distributed: bool) -> StepPlan:
    """`training.compile` on this device: `auto` is `graphs` on one CUDA GPU, `on` under DDP (whose
    gradient hooks a captured graph would skip) and `off` on the CPU (compiling takes minutes there);
    `graphs` is `on` wherever it cannot capture."""
    if compile_setting == "off" or (compile_setting == "auto" and dev.type != "cuda"):
        return StepPlan.eager
    if compile_setting in ("auto", "graphs") and dev.type == "cuda" and not distributed:
        return StepPlan.captured
    return StepPlan.compiled


class StepOutOfMemoryError(RuntimeError):
    """A step ran out of GPU memory and the job's `on_oom` policy could not make it fit."""


class _GradientsOutOfMemory(Exception):
    """Out of memory while computing the gradients: nothing but the gradients (and dropout's RNG)
    was touched, so the step can be redone."""


class TrainStep:
    """See the module docstring. `events` collects what the job should hear of (the loop hands
    them to its sink at the next report)."""

    def __init__(
        self,
        state: LiveState,
        schedule: NoiseSchedule,
        plan: StepPlan,
        *,
        distributed: bool,
        max_nonfinite: int,
        share: int,
    ) -> None:
        self.state, self.schedule, self.plan = state, schedule, plan
        self.cfg: TrainingSpec = state.spec.training
        self.distributed, self.max_nonfinite, self.share = distributed, max_nonfinite, share
        self.events: list[TrainingEvent] = []
        self.tried: list[int] = []  # micro-batch sizes that ran out of memory, in order
        self.step_number = torch.zeros((), dtype=torch.int64, device=state.dev)  # read by the window
        self.forward_backward = _ForwardBackward(state, plan is not StepPlan.eager, self._fell_back)
        self.graph = _CapturedStep(self._body, self._fell_back, state) if plan is StepPlan.captured else None

    def __call__(self, step: int, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> None:
        """One optimizer step at 1-based `step` on this rank's batch ((B/k, C, H, W), (B/k,), (B/k, C, H, W))."""
        self.step_number.fill_(step)
        while True:
            try:
                if self.graph is not None:
                    self.graph(x_t, t, target)
                else:
                    self._body(x_t, t, target)
                return
            except _GradientsOutOfMemory as oom:
                log.warning("step %d: %s", step, oom.__cause__)
            self._halve(step)  # outside the except block, so that the failed pass's tensors can be freed

    def _body(self, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> None:
        """The step itself: what a CUDA graph captures. Device work only, no host reads."""
        try:
            loss, image_losses = self._gradients(x_t, t, target)
        except torch.cuda.OutOfMemoryError as exc:
            raise _GradientsOutOfMemory from exc
        state = self.state
        loss = mean_over_ranks(loss) if self.distributed else loss  # the global batch's loss
        grad_norm = torch.nn.utils.clip_grad_norm_(state.params, self.cfg.grad_clip)
        # Update, unless the loss or gradient is NaN/inf: skipping keeps weights, optimizer moments
        # and EMA clean. No host read: the fused AdamW kernel skips itself when `found_inf` is 1
        # (and undoes its step count), the EMA update gets weight 0, and the streak of skipped
        # steps is checked at the next metric point or checkpoint.
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)  # 0-d bool, on the device
        state.skip.copy_(finite.logical_not())
        state.optimizer.step()
        state.ema.step(finite)
        state.window.add(self.step_number, loss, finite, self.max_nonfinite, t, image_losses)
        state.optimizer.zero_grad(set_to_none=True)

    def _gradients(self, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss (0-d, detached) and its images' unweighted losses ((B/k,)), with the
        loss's gradients accumulated into the parameters, one micro-batch at a time.

        A micro-batch of m of the n images weights its images by m/n on top of the loss weighting,
        so that the micro-batch means add up to the batch mean. Under DDP, the gradients are
        all-reduced once, with the last micro-batch's backward."""
        weights = self.schedule.loss_weights(t)  # (B/k,)
        n, m = x_t.shape[0], self.state.micro_batch
        if m >= n:
            return self.forward_backward(x_t, t, target, weights)
        starts = range(0, n, m)
        losses, image_losses = [], []
        for start in starts:
            part = slice(start, start + m)
            last = start == starts[-1]
            share = (min(m, n - start)) / n
            with contextlib.nullcontext() if last or not self.distributed else self.state.model.no_sync():
                loss, losses_of_images = self.forward_backward(x_t[part], t[part], target[part], weights[part] * share)
            losses.append(loss)
            image_losses.append(losses_of_images)
        return torch.stack(losses).sum(), torch.cat(image_losses)

    def _drop_gradients(self) -> None:
        self.state.optimizer.zero_grad(set_to_none=True)

    def _halve(self, step: int) -> None:
        """After an out-of-memory pass: drop its gradients, then halve the micro-batch, or fail."""
        self._drop_gradients()
        if self.graph is not None:
            self.graph.reset()
        # The failed pass's activations hang off its traceback's frames, which form reference
        # cycles: collect them, then give their blocks back before trying smaller.
        gc.collect()
        if self.state.dev.type == "cuda":
            torch.cuda.empty_cache()
        was = self.state.micro_batch
        self.tried.append(was)
        if self.cfg.on_oom == "fail" or self.distributed or was == 1:
            raise StepOutOfMemoryError(self._failure(step))
        self.state.micro_batch = max(1, was // 2)
        self._event(
            step,
            EventKind.oom_halved,
            f"out of GPU memory at step {step} with micro-batches of {was} images: redone with "
            f"{self.state.micro_batch} (batch unchanged: {self.share} images per GPU)",
            {"micro_batch": self.state.micro_batch, "was": was, "batch": self.share},
        )

    def _failure(self, step: int) -> str:
        tried = ", ".join(str(size) for size in self.tried)
        if self.distributed:
            why = "a multi-GPU job cannot redo a step on one GPU alone: set training.micro_batch"
        elif self.cfg.on_oom == "fail":
            why = "training.on_oom is fail: set training.micro_batch, or on_oom: halve"
        else:
            why = "lower training.batch_size, or use a smaller model"
        return (
            f"out of GPU memory at step {step} with micro-batches of {tried} images "
            f"(training.batch_size {self.cfg.batch_size}, {self.share} per GPU); {why}"
        )

    def _fell_back(self, kind: EventKind, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"[:500]
        what = (
            "torch.compile failed: training without compilation"
            if kind is EventKind.compile_failed
            else ("capturing the step as a CUDA graph failed: training compiled, step by step")
        )
        self._event(int(self.step_number.item()), kind, f"{what} ({error})", {"error": error})

    def _event(self, step: int, kind: EventKind, message: str, detail: dict[str, Any]) -> None:
        log.warning("%s", message)
        self.events.append(TrainingEvent(step=step, kind=kind, message=message, detail=detail))


class _ForwardBackward:
    """The forward pass, the loss and its backward: compiled or eager.

    The loss is the mean of each image's MSE to the target (mean over C, H, W, in fp32) times its
    weight (`NoiseSchedule.loss_weights`, times a micro-batch's share of the batch; all 1 without
    loss weighting or micro-batches, where it equals `F.mse_loss` up to float rounding). Each image's
    unweighted MSE comes back too, detached, for the loss per range of t.

    The first compiled call is checked: when compilation fails (inductor raises many kinds of
    errors, hence the broad except), the call's gradients are dropped, it is redone eagerly, and
    training goes on uncompiled: the same computation, so the same losses. Out of memory is not a
    compilation failure: it goes to the caller.
    """

    def __init__(self, state: LiveState, compiled: bool, fell_back: Callable[[EventKind, BaseException], None]) -> None:
        model, on_cuda = state.model, state.dev.type == "cuda"

        def forward_loss(
            x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            # bf16 autocast for the forward pass on CUDA (no weight-cast cache: a captured graph
            # must not keep casts across replays); the loss in fp32. The CPU stays fp32. (The
            # context is entered here, not built outside, so that torch.compile traces it.)
            with torch.autocast(state.dev.type, dtype=torch.bfloat16, enabled=on_cuda, cache_enabled=False):
                prediction = model(x_t, t, return_dict=False)[0]  # (B, C, H, W)
            image_losses = (prediction.float() - target).square().mean(dim=(1, 2, 3))  # (B,)
            return (image_losses * weights).mean(), image_losses.detach()

        self.optimizer, self.fell_back = state.optimizer, fell_back
        self.eager: Callable[..., tuple[torch.Tensor, torch.Tensor]] = forward_loss
        self.loss_of = torch.compile(forward_loss) if compiled else forward_loss

    def __call__(self, *batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch` = (x_t, t, target, weights). The loss (0-d, detached) and the images' unweighted
        losses ((B,)), on the device; the loss's gradients accumulated into the parameters."""
        if self.loss_of is self.eager:
            return self._loss_and_backward(*batch)
        try:  # every compiled call: a new micro-batch size compiles again
            return self._loss_and_backward(*batch)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            self.fell_back(EventKind.compile_failed, exc)
            self.optimizer.zero_grad(set_to_none=True)
            self.loss_of = self.eager
            return self._loss_and_backward(*batch)

    def _loss_and_backward(self, *batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, image_losses = self.loss_of(*batch)
        loss.backward()
        return loss.detach(), image_losses


class CudaGraphs:
    """What `_CapturedStep` uses of torch.cuda, in one place (the CPU tests stand in for it)."""

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)

    def new_graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    def capturing(self, graph: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.graph(graph)

    def rng_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state()  # dropout's generator

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state)

    def release(self) -> None:
        torch.cuda.empty_cache()


CUDA_GRAPHS = CudaGraphs()

# A captured step is trusted once its first replay on a new batch changed every state tensor as
# the step run as usual does, to this relative difference of the changes: far above what
# nondeterministic kernels leave (~1e-6), far below what a stale input or a number baked into the
# graph gives (~1).
CHECK_RTOL = 1e-2


class _CapturedStep:
    """The whole step as one CUDA graph (see the module docstring): `WARMUP_STEPS` calls run the
    step on a side stream; the next one captures it and replays it; the one after checks it (the
    first replay on a new batch, learning rate and step number: replayed, undone, run as usual,
    compared; a mismatch drops the graph: an event, and the job goes on step by step); every later
    call copies the batch into the graph's inputs and replays. `reset()` (after an out-of-memory
    pass, whose micro-batch change makes a new step) drops the graph and warms up again."""

    def __init__(
        self,
        body: Callable[..., None],
        fell_back: Callable[[EventKind, BaseException], None],
        state: LiveState,
        cuda: CudaGraphs | None = None,
    ) -> None:
        self.body, self.fell_back, self.state = body, fell_back, state
        self.cuda = cuda or CUDA_GRAPHS
        self.graph: Any = None
        self.inputs: tuple[torch.Tensor, ...] = ()  # the tensors the graph reads its batch from
        self.warm = 0
        self.checked = False
        self.failed = False  # capturing or checking failed once: run the body step by step from then on

    def __call__(self, *batch: torch.Tensor) -> None:
        if self.failed:
            self.body(*batch)
        elif self.graph is None and self.warm < WARMUP_STEPS:
            with self.cuda.side_stream():
                self.body(*batch)
            self.warm += 1
        elif self.graph is None:
            self._capture(*batch)
        elif not self.checked:
            self._check(*batch)
        else:
            self._replay(*batch)

    def _replay(self, *batch: torch.Tensor) -> None:
        for static, new in zip(self.inputs, batch, strict=True):
            static.copy_(new)
        self.graph.replay()

    def _capture(self, *batch: torch.Tensor) -> None:
        """Capture this step (nothing runs while capturing), then replay it: this step's update."""
        self.inputs = tuple(b.clone() for b in batch)  # the graph's own input tensors (same memory layout)
        graph = self.cuda.new_graph()
        try:
            with self.cuda.capturing(graph):
                self.body(*self.inputs)
        except Exception as exc:  # capture raises many kinds of errors; nothing ran, so redo the step
            if _out_of_memory(exc):  # the caller halves the micro-batch and we warm up again
                raise _GradientsOutOfMemory from exc
            del graph
            self._give_up(exc)
            self.body(*batch)
            return
        self.graph = graph
        graph.replay()

    def _check(self, *batch: torch.Tensor) -> None:
        """This step replayed, then undone and run as usual; the graph is kept if both changed the
        state alike. Either way the state is the usual run's. Once per capture; the copies of the
        state go to host memory (a GPU near full could not hold two more), and the host reads
        wait for the device."""
        tensors = self.state.step_tensors()
        before, rng = _host_copies(tensors), self.cuda.rng_state()  # SYNC (once)
        self._replay(*batch)
        replayed = _host_copies(tensors)  # SYNC (once)
        with torch.no_grad():  # the weights are leaves that require grad
            for tensor, saved in zip(tensors, before, strict=True):
                tensor.copy_(saved)  # host to device
        self.cuda.set_rng_state(rng)
        self.body(*batch)
        difference = _largest_relative_change_difference(before, replayed, _host_copies(tensors))  # SYNC (once)
        self.checked = True
        if difference > CHECK_RTOL:
            self._give_up(RuntimeError(f"its first replay differs from the step by {difference:.2g} (relative)"))

    def _give_up(self, exc: BaseException) -> None:
        self.failed, self.graph, self.inputs = True, None, ()
        self.fell_back(EventKind.graphs_failed, exc)
        self.state.optimizer.zero_grad(set_to_none=True)  # gradients a failed capture left point into its memory
        self.cuda.release()

    def reset(self) -> None:
        self.graph, self.inputs, self.warm, self.checked = None, (), 0, False


def _host_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().to("cpu", copy=True) for t in tensors]


def _largest_relative_change_difference(
    before: list[torch.Tensor], replayed: list[torch.Tensor], usual: list[torch.Tensor]
) -> float:
    """max over tensors of |replayed - before - (usual - before)| / |usual - before| (norms; an
    unchanged tensor must stay unchanged)."""
    differences = []
    for b, r, u in zip(before, replayed, usual, strict=True):
        change = u.double() - b.double()
        differences.append((r.double() - u.double()).norm() / change.norm().clamp(min=1e-30))
    return float(torch.stack(differences).max().item()) if differences else 0.0


def _out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is, or was raised while handling or because of, a CUDA out-of-memory error
    (ending a failed capture raises its own error, with the first one as its context)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (torch.cuda.OutOfMemoryError, _GradientsOutOfMemory)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
