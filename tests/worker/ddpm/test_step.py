"""The step's micro-batches, its out-of-memory policy and the efficiency fields of metric points
(worker/ddpm/step.py, worker/ddpm/efficiency.py), on the CPU.

Running out of GPU memory is simulated by raising the real `torch.cuda.OutOfMemoryError` from the
U-Net's forward pass, as the CUDA caching allocator does."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from app.spec import JobSpec
from worker.ddpm import step as step_module
from worker.ddpm import trainer as trainer_module
from worker.ddpm.checkpoint import load_state
from worker.ddpm.efficiency import Efficiency, peak_bf16_flops, training_flops_per_image
from worker.ddpm.sink import EventKind
from worker.ddpm.state import LiveState
from worker.ddpm.step import StepOutOfMemoryError
from worker.ddpm.trainer import train

SpecFactory = Callable[..., JobSpec]
FORWARD = UNet2DModel.forward


def _losses(sink: Any) -> list[float]:
    return [p.loss for p in sink.points]


def _running_out_of_memory(monkeypatch: pytest.MonkeyPatch, fits: Callable[[int, int], bool]) -> list[int]:
    """Make the U-Net's forward pass raise CUDA's out-of-memory error unless `fits(call, images)`
    (`call`: 0, 1, ... over every pass tried); returns the batch sizes of the passes that ran."""
    ran: list[int] = []
    calls = iter(range(10**6))

    def forward(self: UNet2DModel, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not fits(next(calls), sample.shape[0]):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        ran.append(sample.shape[0])
        return FORWARD(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DModel, "forward", forward)
    return ran


class TestMicroBatches:
    @pytest.mark.parametrize("micro_batch", [4, 3])  # 3: micro-batches of 3, 3 and 2 images
    def test_same_losses_as_the_whole_batch(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, micro_batch: int
    ) -> None:
        whole, split = make_sink(), make_sink()
        spec = tiny_spec(diffusion={"loss_weighting": "min_snr"}, training={"steps": 6})
        train(spec, tmp_path / "whole", whole, device="cpu")
        train(
            tiny_spec(training={"steps": 6, "micro_batch": micro_batch}, diffusion={"loss_weighting": "min_snr"}),
            tmp_path / "split",
            split,
            device="cpu",
        )
        assert _losses(split) == pytest.approx(_losses(whole), rel=1e-5)
        for a, b in zip(whole.points, split.points, strict=True):  # the loss per range of t too
            assert [v is None for v in a.loss_by_t] == [v is None for v in b.loss_by_t]
            assert [v for v in b.loss_by_t if v is not None] == pytest.approx(
                [v for v in a.loss_by_t if v is not None], rel=1e-5
            )
        weights = [load_file(s.checkpoints[-1].path) for s in (whole, split)]
        worst = max((weights[1][name] - tensor).abs().max().item() for name, tensor in weights[0].items())
        assert worst < 1e-5  # Adam divides by the gradients' scale: rounding shows in the weights more

    def test_passes_have_the_micro_batch_size(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ran = _running_out_of_memory(monkeypatch, lambda call, images: True)
        train(tiny_spec(training={"steps": 2, "micro_batch": 3}), tmp_path, make_sink(), device="cpu")
        assert ran == [3, 3, 2] * 2

    def test_larger_than_each_gpus_share_is_refused(self, tiny_spec: SpecFactory) -> None:
        with pytest.raises(ValueError, match=r"training.micro_batch \(8\) must be at most .* = 4\)"):
            tiny_spec(training={"micro_batch": 8}, resources={"gpus": 2})


class TestOutOfMemory:
    def test_halves_the_micro_batch_and_keeps_the_maths(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        whole, halved, resumed = make_sink(), make_sink(), make_sink()
        spec = tiny_spec(training={"steps": 6, "checkpoint_every": 3})
        train(spec, tmp_path / "whole", whole, device="cpu")
        ran = _running_out_of_memory(monkeypatch, lambda call, images: images <= 2)
        train(spec, tmp_path / "halved", halved, device="cpu")

        # 8 and 4 images ran out of memory at step 1; every step then ran as 4 passes of 2 images.
        assert ran == [2] * 4 * 6
        assert [(e.step, e.kind, e.detail) for e in halved.events] == [
            (1, EventKind.oom_halved, {"micro_batch": 4, "was": 8, "batch": 8}),
            (1, EventKind.oom_halved, {"micro_batch": 2, "was": 4, "batch": 8}),
        ]
        assert halved.events[0].message == (
            "out of GPU memory at step 1 with micro-batches of 8 images: redone with 4 (batch unchanged: 8 images "
            "per GPU)"
        )
        assert _losses(halved) == pytest.approx(_losses(whole), rel=1e-5)

        # The checkpoint keeps the micro-batch the run came down to; a resumed run goes on with it.
        assert load_state(halved.checkpoints[0].state_path).values["micro_batch"] == 2
        ran.clear()
        train(spec, tmp_path / "resumed", resumed, device="cpu", resume_from=halved.checkpoints[0].path)
        assert ran == [2] * 4 * 3 and resumed.events == []
        assert _losses(resumed) == _losses(halved)[3:]

    def test_a_pass_failing_midway_drops_the_step_s_partial_gradients(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Step 2's second micro-batch of 4 runs out of memory after the first one's backward:
        the step is redone from scratch with micro-batches of 2, and the losses stay the whole batch's."""
        whole, split = make_sink(), make_sink()
        train(tiny_spec(training={"steps": 4}), tmp_path / "whole", whole, device="cpu")
        _running_out_of_memory(monkeypatch, lambda call, images: call != 3)  # calls 0, 1: step 1; 2, 3: step 2
        train(tiny_spec(training={"steps": 4, "micro_batch": 4}), tmp_path / "split", split, device="cpu")
        assert [(e.step, e.detail["micro_batch"]) for e in split.events] == [(2, 2)]
        assert _losses(split) == pytest.approx(_losses(whole), rel=1e-5)

    def test_fails_at_the_floor_naming_the_sizes_tried(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _running_out_of_memory(monkeypatch, lambda call, images: False)
        with pytest.raises(StepOutOfMemoryError) as failed:
            train(tiny_spec(), tmp_path, make_sink(), device="cpu")
        assert str(failed.value) == (
            "out of GPU memory at step 1 with micro-batches of 8, 4, 2, 1 images (training.batch_size 8, 8 per "
            "GPU); lower training.batch_size, or use a smaller model"
        )
        assert list(tmp_path.glob("*.safetensors")) == []  # nothing half-trained was saved

    def test_on_oom_fail_fails_at_once(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ran = _running_out_of_memory(monkeypatch, lambda call, images: images <= 2)
        with pytest.raises(StepOutOfMemoryError, match=r"micro-batches of 8 images \(.*\); training.on_oom is fail"):
            train(tiny_spec(training={"on_oom": "fail"}), tmp_path, make_sink(), device="cpu")
        assert ran == []


class TestEfficiency:
    def test_metric_points_carry_mfu_when_the_peak_is_known(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any
    ) -> None:
        spec, unknown, known = tiny_spec(training={"steps": 4}), make_sink(), make_sink()
        train(spec, tmp_path / "a", unknown, device="cpu")
        assert [(p.mfu, p.peak_memory_bytes) for p in unknown.points] == [(None, None)] * 4  # a CPU has no peak
        train(spec, tmp_path / "b", known, device="cpu", peak_flops=1e12)
        flops = training_flops_per_image(spec)
        for point in known.points:
            assert point.mfu == pytest.approx(point.images_per_s * flops / 1e12)
            assert point.peak_memory_bytes is None  # GPU memory only

    def test_flops_count_the_network_once_without_touching_the_rng(self, tiny_spec: SpecFactory) -> None:
        rng = torch.get_rng_state()
        small, large = (
            training_flops_per_image(tiny_spec()),
            training_flops_per_image(tiny_spec(dataset={"image_size": 16})),
        )
        assert torch.equal(torch.get_rng_state(), rng)
        # Convolutions dominate and scale with the pixels: 4x the pixels, about 4x the FLOPs.
        assert small > 1e6 and 3.5 < large / small < 4.5
        assert Efficiency.measure(tiny_spec(), torch.device("cpu"), 2e12, world_size=2).mfu(10.0) == pytest.approx(
            10.0 * small / 4e12
        )

    @pytest.mark.parametrize(
        ("name", "tflops"),
        [
            ("NVIDIA H200", 989),
            ("NVIDIA H100 80GB HBM3", 989),
            ("NVIDIA H100 PCIe", 756),
            ("NVIDIA A100-SXM4-80GB", 312),
            ("NVIDIA A10G", 70),
            ("NVIDIA A10", 125),
            ("NVIDIA L4", 121),
            ("NVIDIA L40S", 362),
            ("NVIDIA GeForce RTX 4090", 165),
            ("Tesla T4", None),
        ],
    )
    def test_peak_by_device_name(self, name: str, tflops: float | None) -> None:
        assert peak_bf16_flops(name) == (tflops * 1e12 if tflops else None)


def test_a_capturable_state_checkpoints_its_tensor_learning_rate_as_a_number(tiny_spec: SpecFactory) -> None:
    """A step replayed as a CUDA graph reads the learning rate from a tensor (AdamW capturable)."""
    from worker.ddpm.distributed import Ranks

    spec = tiny_spec()
    state = LiveState.build(
        spec,
        torch.device("cpu"),
        torch.contiguous_format,
        ranks=Ranks(),
        distributed=False,
        resume_from=None,
        capturable=True,
    )
    lr = state.optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    state.set_learning_rate(1e-3)
    assert state.optimizer.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(1e-3)
    from worker.ddpm.state import WindowValues

    _, saved = state.snapshot(1, WindowValues(0.0, 0, 0, 0, 0))
    assert saved.optimizer["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert saved.values["micro_batch"] == 8


class _CpuGraphs(step_module.CudaGraphs):
    """CUDA graphs, played on the CPU: capturing runs the step and undoes it (a capture runs
    nothing); a replay runs the step on the graph's input tensors, or with `stale`, on the batch it
    was captured with (a graph that missed its input copies)."""

    def __init__(self, runner: step_module._CapturedStep, stale: bool) -> None:
        self.runner, self.stale, self.replays = runner, stale, 0

    def side_stream(self) -> Any:
        return contextlib.nullcontext()

    def new_graph(self) -> Any:
        return SimpleNamespace(replay=self._replay)

    @contextlib.contextmanager
    def capturing(self, graph: Any) -> Iterator[None]:
        tensors = self.runner.state.step_tensors()
        before, rng = [t.detach().clone() for t in tensors], torch.get_rng_state()
        yield
        with torch.no_grad():
            torch._foreach_copy_(tensors, before)
        torch.set_rng_state(rng)
        self.captured = tuple(t.clone() for t in self.runner.inputs)

    def _replay(self) -> None:
        self.replays += 1
        self.runner.body(*(self.captured if self.stale else self.runner.inputs))

    def rng_state(self) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.set_rng_state(state)

    def release(self) -> None:
        pass


class TestCapturedStep:
    """The whole-step graph's life (warm-up, capture, check, replays, fallback) with CUDA graphs
    played on the CPU by `_CpuGraphs`; the real capture is checked on a GPU by `python -m bench gpu`."""

    def _train_captured(
        self, spec: JobSpec, out: Path, sink: Any, monkeypatch: pytest.MonkeyPatch, stale: bool
    ) -> list[_CpuGraphs]:
        graphs: list[_CpuGraphs] = []

        class OnCpu(step_module._CapturedStep):
            def __init__(self, *args: Any) -> None:
                super().__init__(*args)
                self.cuda = _CpuGraphs(self, stale)
                graphs.append(self.cuda)

        monkeypatch.setattr(step_module, "_CapturedStep", OnCpu)
        monkeypatch.setattr(trainer_module, "step_plan", lambda *args: step_module.StepPlan.captured)
        monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # compiling takes minutes on a CPU
        train(spec, out, sink, device="cpu")
        return graphs

    @pytest.mark.parametrize("micro_batch", [None, 4])
    def test_replays_train_as_the_usual_step(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch, micro_batch: Any
    ) -> None:
        spec = tiny_spec(model={"dropout": 0.1}, training={"steps": 8, "micro_batch": micro_batch})
        usual, graphed = make_sink(), make_sink()
        train(spec, tmp_path / "usual", usual, device="cpu")
        (graphs,) = self._train_captured(spec, tmp_path / "graphed", graphed, monkeypatch, stale=False)
        # Steps 1-3 warm up, 4 is captured and replayed, 5 replayed and checked, 6-8 replayed.
        assert graphs.replays == 5 and graphed.events == []
        assert _losses(graphed) == pytest.approx(_losses(usual), rel=1e-6)  # the learning rate as a float32 tensor

    def test_a_replay_that_differs_from_the_step_drops_the_graph(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spec = tiny_spec(training={"steps": 8})
        usual, graphed = make_sink(), make_sink()
        train(spec, tmp_path / "usual", usual, device="cpu")
        (graphs,) = self._train_captured(spec, tmp_path / "graphed", graphed, monkeypatch, stale=True)
        assert graphs.replays == 2  # the capture's, and the check's, which found it wrong
        ((event),) = graphed.events
        assert (event.step, event.kind) == (5, EventKind.graphs_failed)
        assert event.message.startswith(
            "capturing the step as a CUDA graph failed: training compiled, step by step (RuntimeError: its first "
            "replay differs from the step by"
        )
        assert _losses(graphed) == pytest.approx(_losses(usual), rel=1e-6)  # the checked step is the usual one
