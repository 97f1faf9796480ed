"""The training loop: cadence, the loss and its buckets of t, reproducibility, exact resume, stopping,
non-finite losses."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from app.files import atomic_write
from app.spec import JobSpec
from worker.ddpm import trainer
from worker.ddpm.checkpoint import load_state, serialize_state
from worker.ddpm.distributed import Ranks
from worker.ddpm.model import build_unet
from worker.ddpm.schedule import NoiseSchedule
from worker.ddpm.sink import LOSS_BUCKETS, EventKind, MetricPoint, SavedCheckpoint, SavedSample, StopReason, TrainResult
from worker.ddpm.state import NO_LOSS_BY_T, derive_seed
from worker.ddpm.step import StepPlan, step_plan
from worker.ddpm.trainer import NonFiniteLossError, learning_rate, train

SpecFactory = Callable[..., JobSpec]


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


class TestCadence:
    def test_points_and_checkpoints(self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any) -> None:
        sink = make_sink()
        spec = tiny_spec(training={"steps": 7, "log_every": 2, "checkpoint_every": 3})
        result = train(spec, tmp_path, sink, device="cpu")
        assert [p.step for p in sink.points] == [2, 4, 6, 7]
        assert [c.step for c in sink.checkpoints] == [3, 6, 7]
        assert result == TrainResult(final_step=7, last_loss=sink.points[-1].loss)
        assert _files(tmp_path) == [f"step-{s:08d}{suffix}.safetensors" for s in (3, 6, 7) for suffix in ("", ".state")]
        assert all(p.images_per_s > 0 for p in sink.points)
        assert all(len(p.loss_by_t) == LOSS_BUCKETS for p in sink.points)

    def test_loss_is_mean_over_window_and_lr_warms_up(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any
    ) -> None:
        every, pairs = make_sink(), make_sink()
        train(tiny_spec(training={"steps": 4, "log_every": 1}), tmp_path / "a", every, device="cpu")
        train(tiny_spec(training={"steps": 4, "log_every": 2}), tmp_path / "b", pairs, device="cpu")
        losses = [p.loss for p in every.points]
        assert [p.loss for p in pairs.points] == pytest.approx([sum(losses[:2]) / 2, sum(losses[2:]) / 2], rel=1e-6)
        assert [p.lr for p in every.points] == pytest.approx([1e-4, 2e-4, 2e-4, 2e-4])  # warmup_steps=2

    def test_learning_rate_without_warmup(self, tiny_spec: SpecFactory) -> None:
        cfg = tiny_spec(training={"warmup_steps": 0}).training
        assert learning_rate(1, cfg) == cfg.learning_rate


def _first_step_image_losses(spec: JobSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1 redone outside the loop: t and each image's MSE to the target, from the initial
    weights (what the loop seeds) and the same draw of x_t, t and target."""
    torch.manual_seed(spec.training.seed)
    unet = build_unet(spec).train()
    noise = torch.Generator().manual_seed(derive_seed(spec.training.seed, "noise"))
    with trainer._NoisyBatches(spec, torch.device("cpu"), Ranks(), None, None) as data:
        x_t, t, target = data.draw(1, noise)
    with torch.no_grad():
        return t, (unet(x_t, t).sample - target).square().mean(dim=(1, 2, 3))  # (B,), (B,)


class TestLoss:
    @pytest.mark.parametrize("loss_weighting", ["none", "min_snr"])
    def test_a_one_step_window_matches_a_recomputation(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, loss_weighting: str
    ) -> None:
        spec = tiny_spec(diffusion={"prediction": "eps", "loss_weighting": loss_weighting}, training={"steps": 1})
        sink = make_sink()
        train(spec, tmp_path, sink, device="cpu")
        (point,) = sink.points

        t, image_losses = _first_step_image_losses(spec)
        buckets = t * LOSS_BUCKETS // spec.diffusion.timesteps
        expected = [image_losses[buckets == i].mean().item() if (buckets == i).any() else None for i in range(10)]
        assert None in expected  # 8 images, 10 buckets
        # Unweighted, whatever the weighting; None where no image fell.
        assert [v is None for v in point.loss_by_t] == [v is None for v in expected]
        assert [v for v in point.loss_by_t if v is not None] == pytest.approx([v for v in expected if v is not None])
        weights = NoiseSchedule(spec.diffusion).loss_weights(t)
        assert point.loss == pytest.approx((weights * image_losses).mean().item(), rel=1e-5)
        if loss_weighting == "none":
            assert point.loss == pytest.approx(image_losses.mean().item(), rel=1e-5)  # the plain MSE

    def test_min_snr_trains_on_another_loss(self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any) -> None:
        plain, min_snr = make_sink(), make_sink()
        train(tiny_spec(diffusion={"prediction": "eps"}), tmp_path / "a", plain, device="cpu")
        spec = tiny_spec(diffusion={"prediction": "eps", "loss_weighting": "min_snr", "min_snr_gamma": 2.0})
        train(spec, tmp_path / "b", min_snr, device="cpu")
        assert all(p.loss == p.loss for p in min_snr.points)  # finite
        assert all(a.loss != b.loss for a, b in zip(plain.points, min_snr.points, strict=True))
        # Step 1 (the same weights and draws) measures the same unweighted loss per bucket of t;
        # then the weighting has changed the weights.
        assert plain.points[0].loss_by_t == min_snr.points[0].loss_by_t
        assert plain.points[-1].loss_by_t != min_snr.points[-1].loss_by_t


class TestReproducibility:
    def test_same_seed_same_losses(self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any) -> None:
        a, b, c = make_sink(), make_sink(), make_sink()
        spec = tiny_spec(model={"dropout": 0.1})
        train(spec, tmp_path / "a", a, device="cpu")
        train(spec, tmp_path / "b", b, device="cpu")
        train(tiny_spec(model={"dropout": 0.1}, training={"seed": 1}), tmp_path / "c", c, device="cpu")
        assert [p.loss for p in a.points] == [p.loss for p in b.points]
        assert [p.loss for p in a.points] != [p.loss for p in c.points]
        assert load_file(a.checkpoints[-1].path).keys() == load_file(b.checkpoints[-1].path).keys()


def _no_rate(point: MetricPoint) -> tuple[int, float, float, tuple[float | None, ...]]:
    """A metric point without its wall-clock throughput."""
    return (point.step, point.loss, point.lr, point.loss_by_t)


def _assert_same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert different == []


class TestExactResume:
    """N steps in one go == N/2 steps, stop, resume from the N/2 checkpoint: bit for bit."""

    @pytest.mark.parametrize("log_every", [1, 2])  # 2: the resume point falls inside a metric window
    @pytest.mark.parametrize(("prediction", "loss_weighting"), [("x0", "none"), ("v", "min_snr")])
    def test_bit_identical(
        self,
        tmp_path: Path,
        tiny_spec: SpecFactory,
        make_sink: Any,
        log_every: int,
        prediction: str,
        loss_weighting: str,
    ) -> None:
        spec = tiny_spec(
            model={"dropout": 0.1},  # exercises the global RNG state
            diffusion={"prediction": prediction, "loss_weighting": loss_weighting},
            training={"steps": 6, "checkpoint_every": 3, "log_every": log_every, "warmup_steps": 4},
        )
        whole = make_sink()
        train(spec, tmp_path / "whole", whole, device="cpu")

        first = make_sink(stop_on_checkpoint_at=3)
        assert train(spec, tmp_path / "split", first, device="cpu").stopped
        second = make_sink()
        result = train(spec, tmp_path / "split", second, device="cpu", resume_from=first.checkpoints[-1].path)

        assert result.final_step == 6 and not result.stopped
        assert [c.step for c in second.checkpoints] == [6]
        # Identical loss points (step, loss, lr, loss_by_t) after the resume point; only the wall-clock rate differs.
        assert [_no_rate(p) for p in first.points + second.points] == [_no_rate(p) for p in whole.points]
        end_whole, end_split = whole.checkpoints[-1], second.checkpoints[-1]
        _assert_same_tensors(load_file(end_whole.path), load_file(end_split.path))  # EMA (served)
        state_whole, state_split = load_state(end_whole.state_path), load_state(end_split.state_path)
        _assert_same_tensors(state_whole.model, state_split.model)  # raw weights
        assert end_whole.sha256 == end_split.sha256  # whole files, metadata included
        assert state_whole.ema["optimization_step"] == state_split.ema["optimization_step"] == 6

    def test_extending_a_finished_run(self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any) -> None:
        whole, short, rest = make_sink(), make_sink(), make_sink()
        long_spec = tiny_spec(training={"steps": 6, "checkpoint_every": 100})
        train(long_spec, tmp_path / "whole", whole, device="cpu")
        train(tiny_spec(training={"steps": 3, "checkpoint_every": 100}), tmp_path / "split", short, device="cpu")
        train(long_spec, tmp_path / "split", rest, device="cpu", resume_from=short.checkpoints[-1].path)
        assert [_no_rate(p) for p in rest.points] == [_no_rate(p) for p in whole.points if p.step > 3]
        _assert_same_tensors(load_file(whole.checkpoints[-1].path), load_file(rest.checkpoints[-1].path))

    def test_a_checkpoint_from_before_loss_by_t_resumes(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any
    ) -> None:
        spec = tiny_spec(training={"steps": 4, "checkpoint_every": 2})
        whole, first, second = make_sink(), make_sink(stop_on_checkpoint_at=2), make_sink()
        train(spec, tmp_path / "whole", whole, device="cpu")
        train(spec, tmp_path / "split", first, device="cpu")
        old = load_state(first.checkpoints[-1].state_path)
        del old.tensors["loss_by_t"]  # as written before the loss per range of t
        atomic_write(first.checkpoints[-1].state_path, serialize_state(old))
        train(spec, tmp_path / "split", second, device="cpu", resume_from=first.checkpoints[-1].path)
        assert [_no_rate(p) for p in second.points] == [_no_rate(p) for p in whole.points if p.step > 2]

    def test_nothing_left_to_do(self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any) -> None:
        done, again = make_sink(), make_sink()
        spec = tiny_spec(training={"steps": 2})
        train(spec, tmp_path, done, device="cpu")
        result = train(spec, tmp_path, again, device="cpu", resume_from=done.checkpoints[-1].path)
        assert result == TrainResult(final_step=2, last_loss=None)
        assert again.points == [] and again.checkpoints == []

    def test_refuses_a_different_spec(self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any) -> None:
        sink = make_sink()
        train(tiny_spec(training={"steps": 2}), tmp_path, sink, device="cpu")
        other = tiny_spec(training={"steps": 4, "learning_rate": 1e-3}, diffusion={"prediction": "eps"})
        with pytest.raises(ValueError, match=r"differs in diffusion\.prediction, training\.learning_rate"):
            train(other, tmp_path, make_sink(), device="cpu", resume_from=sink.checkpoints[-1].path)


class TestStopping:
    def test_a_fenced_stop_saves_nothing_more(self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any) -> None:
        sink = make_sink(stop_on_log_at=2)  # a newer attempt owns the job: not one more write
        result = train(tiny_spec(), tmp_path, sink, device="cpu")
        assert result == TrainResult(final_step=2, last_loss=sink.points[-1].loss, stopped=StopReason.fenced)
        assert sink.checkpoints == [] and list(tmp_path.iterdir()) == []

    def test_a_cancel_keeps_a_checkpoint_of_the_step_it_stopped_at(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any
    ) -> None:
        sink = make_sink(stop_on_log_at=2, stop_reason=StopReason.cancelled)
        result = train(tiny_spec(), tmp_path, sink, device="cpu")
        assert result == TrainResult(final_step=2, last_loss=sink.points[-1].loss, stopped=StopReason.cancelled)
        assert [c.step for c in sink.checkpoints] == [2]
        assert _files(tmp_path) == ["step-00000002.safetensors", "step-00000002.state.safetensors"]

    def test_graceful_stop_saves_the_step_it_stopped_at_and_resumes_exactly(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any
    ) -> None:
        spec = tiny_spec()  # 6 steps, checkpoints at 3 and 6
        straight = make_sink()
        train(spec, tmp_path / "straight", straight, device="cpu")

        stopped = make_sink(stop_on_log_at=2, stop_reason=StopReason.shutdown)
        result = train(spec, tmp_path / "stopped", stopped, device="cpu")
        assert result.stopped is StopReason.shutdown and result.final_step == 2
        assert [c.step for c in stopped.checkpoints] == [2]
        resumed = make_sink()
        train(spec, tmp_path / "stopped", resumed, device="cpu", resume_from=stopped.checkpoints[0].path)
        assert [(p.step, p.loss) for p in stopped.points + resumed.points] == [
            (p.step, p.loss) for p in straight.points
        ]
        assert resumed.checkpoints[-1].sha256 == straight.checkpoints[-1].sha256

    def test_stop_on_checkpoint(self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any) -> None:
        sink = make_sink(stop_on_checkpoint_at=3)
        result = train(tiny_spec(), tmp_path, sink, device="cpu")
        assert result.stopped and result.final_step == 3
        assert [p.step for p in sink.points] == [1, 2, 3]
        assert _files(tmp_path) == ["step-00000003.safetensors", "step-00000003.state.safetensors"]


class _NaNOnSteps:
    """Stands in for `to_model_range`: the batches of the given 1-based steps come out NaN."""

    def __init__(self, steps: set[int] | None) -> None:
        self.steps, self.calls = steps, 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = images.float() / 127.5 - 1.0
        return torch.full_like(x, float("nan")) if self.steps is None or self.calls in self.steps else x


class TestNonFinite:
    def test_skipped_steps_leave_weights_clean(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(trainer, "to_model_range", _NaNOnSteps({2, 3}))
        sink = make_sink()
        result = train(tiny_spec(training={"steps": 6}), tmp_path, sink, device="cpu")
        assert result.final_step == 6
        losses = {p.step: p.loss for p in sink.points}
        assert all(losses[s] != losses[s] for s in (2, 3))  # NaN: no finite step in those windows
        assert all(losses[s] == losses[s] for s in (1, 4, 5, 6))
        assert [p.loss_by_t == NO_LOSS_BY_T for p in sink.points] == [False, True, True, False, False, False]
        state = load_state(sink.checkpoints[-1].state_path)
        assert all(torch.isfinite(t).all() for t in state.model.values())
        assert state.ema["optimization_step"] == 4 and state.optimizer["state"][0]["step"].item() == 4
        assert state.values["nonfinite_total"] == 2

    def test_too_many_in_a_row(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(trainer, "to_model_range", _NaNOnSteps(None))
        with pytest.raises(NonFiniteLossError, match=r"^non-finite loss at step 3 "):
            train(tiny_spec(), tmp_path, make_sink(), device="cpu", max_nonfinite=3)

    def test_a_streak_is_caught_at_the_next_metric_point_naming_the_step_it_reached_the_limit(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(trainer, "to_model_range", _NaNOnSteps({2, 3, 4}))
        sink = make_sink()
        spec = tiny_spec(training={"steps": 12, "log_every": 5, "checkpoint_every": 100})
        with pytest.raises(NonFiniteLossError, match=r"^non-finite loss at step 4 \(3 consecutive"):
            train(spec, tmp_path, sink, device="cpu", max_nonfinite=3)
        assert sink.points == [] and sink.checkpoints == []  # found at step 5, before its point

    def test_a_streak_is_caught_before_a_checkpoint_is_saved(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(trainer, "to_model_range", _NaNOnSteps({1, 2}))
        sink = make_sink()
        spec = tiny_spec(training={"steps": 12, "log_every": 10, "checkpoint_every": 3})
        with pytest.raises(NonFiniteLossError, match=r"^non-finite loss at step 2 "):
            train(spec, tmp_path, sink, device="cpu", max_nonfinite=2)
        assert list(tmp_path.iterdir()) == []

    def test_a_broken_streak_resets(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(trainer, "to_model_range", _NaNOnSteps({1, 2, 4, 5}))
        sink = make_sink()
        result = train(tiny_spec(training={"steps": 6, "log_every": 6}), tmp_path, sink, device="cpu", max_nonfinite=3)
        assert result.final_step == 6 and sink.points[0].loss == sink.points[0].loss  # steps 3 and 6 counted
        assert load_state(sink.checkpoints[-1].state_path).values["nonfinite_total"] == 4


class _CountHostReads(TorchDispatchMode):
    """Counts `aten._local_scalar_dense`: what `.item()`, `bool(tensor)` and `float(tensor)` run."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


class TestFastPath:
    def test_no_host_read_per_step(self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any) -> None:
        spec = tiny_spec(training={"steps": 8, "log_every": 8, "checkpoint_every": 8})
        with _CountHostReads() as counter:
            train(spec, tmp_path, make_sink(), device="cpu")
        assert counter.reads == 1  # the EMA's update count, for the one checkpoint (the window is read by .tolist())

    def test_a_failed_compile_falls_back_to_eager_with_the_same_losses(
        self,
        tmp_path: Path,
        tiny_spec: SpecFactory,
        make_sink: Any,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        eager, compiled = make_sink(), make_sink()
        train(tiny_spec(training={"compile": "off"}), tmp_path / "eager", eager, device="cpu")

        def broken_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                raise RuntimeError("inductor: no C++ compiler")

            return call

        monkeypatch.setattr(torch, "compile", broken_compile)
        train(tiny_spec(training={"compile": "on"}), tmp_path / "compiled", compiled, device="cpu")
        assert [_no_rate(p) for p in compiled.points] == [_no_rate(p) for p in eager.points]
        message = "torch.compile failed: training without compilation (RuntimeError: inductor: no C++ compiler)"
        assert message in caplog.text
        assert [(e.step, e.kind, e.message) for e in compiled.events] == [(1, EventKind.compile_failed, message)]

    def test_compile_auto_is_whole_step_graphs_on_one_gpu(self, tiny_spec: SpecFactory) -> None:
        cpu, cuda = torch.device("cpu"), torch.device("cuda")
        assert tiny_spec().training.compile == "auto"
        expected = {
            # setting: (CPU, one CUDA GPU, CUDA under DDP)
            "auto": (StepPlan.eager, StepPlan.captured, StepPlan.compiled),
            "graphs": (StepPlan.compiled, StepPlan.captured, StepPlan.compiled),
            "on": (StepPlan.compiled, StepPlan.compiled, StepPlan.compiled),
            "off": (StepPlan.eager, StepPlan.eager, StepPlan.eager),
        }
        for setting, plans in expected.items():
            got = (step_plan(setting, cpu, False), step_plan(setting, cuda, False), step_plan(setting, cuda, True))
            assert got == plans, setting

    def test_channels_last_resumes_exactly(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The CUDA layout, exercised on CPU: resumed moments and EMA take the parameters' layout."""
        monkeypatch.setattr(trainer, "_memory_format", lambda dev: torch.channels_last)
        spec = tiny_spec(training={"steps": 6, "checkpoint_every": 3})
        whole, first, second = make_sink(), make_sink(stop_on_checkpoint_at=3), make_sink()
        train(spec, tmp_path / "whole", whole, device="cpu")
        train(spec, tmp_path / "split", first, device="cpu")
        train(spec, tmp_path / "split", second, device="cpu", resume_from=first.checkpoints[-1].path)
        assert [_no_rate(p) for p in first.points + second.points] == [_no_rate(p) for p in whole.points]
        assert second.checkpoints[-1].sha256 == whole.checkpoints[-1].sha256


class _CheckingSink:
    """Records, at the moment the trainer reports a checkpoint, whether its files are whole."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []

    def on_log(self, point: MetricPoint) -> None:
        pass

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        data = saved.path.read_bytes()
        whole = hashlib.sha256(data).hexdigest() == saved.sha256 and len(data) == saved.size_bytes
        self.seen.append((saved.step, whole and load_state(saved.state_path).step == saved.step))

    def on_sample(self, saved: SavedSample) -> None:
        pass


class TestBackgroundCheckpoints:
    def test_reported_only_once_the_files_are_whole(self, tmp_path: Path, tiny_spec: SpecFactory) -> None:
        sink = _CheckingSink()
        train(tiny_spec(training={"steps": 9, "log_every": 4, "checkpoint_every": 2}), tmp_path, sink, device="cpu")
        assert sink.seen == [(2, True), (4, True), (6, True), (8, True), (9, True)]

    def test_the_saved_state_is_the_state_of_its_step(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any
    ) -> None:
        """Training goes on while the writer serialises: the files must still hold step 3's tensors."""
        spec = tiny_spec(training={"steps": 6, "log_every": 3, "checkpoint_every": 3})
        longer, shorter = make_sink(), make_sink()
        train(spec, tmp_path / "longer", longer, device="cpu")
        train(tiny_spec(training={"steps": 3, "log_every": 3}), tmp_path / "shorter", shorter, device="cpu")
        at_3, alone = longer.checkpoints[0], shorter.checkpoints[-1]  # the files' spec metadata differ (steps)
        _assert_same_tensors(load_file(at_3.path), load_file(alone.path))
        _assert_same_tensors(load_state(at_3.state_path).model, load_state(alone.state_path).model)

    def test_a_failed_write_fails_training(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def disk_full(*args: Any, **kwargs: Any) -> Any:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(trainer, "write_checkpoint", disk_full)
        sink = make_sink()
        with pytest.raises(OSError, match="No space left on device"):
            train(tiny_spec(), tmp_path, sink, device="cpu")
        assert sink.checkpoints == []
