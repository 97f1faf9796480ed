"""Multi-GPU training, on the CPU: 2 ranks with gloo, each its own spawned process, as a worker
runs them. Two ranks with a global batch B compute the gradient of the same loss as one process
with batch B, so their loss curve matches the single-process one to float rounding."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from app.spec import JobSpec
from worker.ddpm.checkpoint import load_state
from worker.ddpm.distributed import Ranks, free_port, process_group, spawn_ranks
from worker.ddpm.trainer import train

pytestmark = pytest.mark.slow

# Stated tolerance for "the same loss curve": the relative difference of each metric point.
# Measured: at most 2.1e-7 over 200 steps (the shards' convolutions sum in another order).
LOSS_RTOL = 1e-5


class _FileSink:
    """Rank 0's sink: writes what it hears to a JSON file the test reads."""

    def __init__(self, out: Path) -> None:
        self.out, self.points, self.checkpoints = out, [], []

    def on_log(self, point: Any) -> None:
        self.points.append([point.step, point.loss, list(point.loss_by_t)])
        self._write()

    def on_checkpoint(self, saved: Any) -> None:
        self.checkpoints.append([saved.step, str(saved.path)])
        self._write()

    def _write(self) -> None:
        self.out.write_text(json.dumps({"points": self.points, "checkpoints": self.checkpoints}))


def _rank(rank: int, spec_json: str, out: str, init_method: str, resume_from: str | None) -> None:
    ranks = Ranks(rank, 2)
    out_dir = Path(out)
    sink = _FileSink(out_dir / "report.json") if ranks.is_main else _FileSink(out_dir / f"rank-{rank}.json")
    resume = Path(resume_from) if resume_from else None
    with process_group(ranks, "cpu", init_method, timeout_s=60):
        train(
            JobSpec.model_validate_json(spec_json),
            out_dir / "checkpoints",
            sink,
            resume_from=resume,
            device="cpu",
            ranks=ranks,
        )


def _train_on_two_ranks(spec: JobSpec, out: Path, resume_from: Path | None = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    args = (spec.model_dump_json(), str(out), f"tcp://127.0.0.1:{free_port()}", str(resume_from or ""))
    context = spawn_ranks(_rank, args, 2)
    while not context.join(timeout=120):
        pass
    assert not (out / "rank-1.json").exists(), "only rank 0 reports"
    return json.loads((out / "report.json").read_text())


@pytest.fixture
def spec(tiny_spec: Any) -> JobSpec:
    return tiny_spec(
        # A checkpoint at 22: inside the metric window of 25, which a resume from it must finish exactly.
        training={"steps": 40, "batch_size": 16, "log_every": 5, "checkpoint_every": 22, "sample_every": 0},
        resources={"gpus": 2},
    )


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path: Path, spec: JobSpec, make_sink: Any) -> None:
    single = make_sink()
    train(
        spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpus": 1})}),
        tmp_path / "one",
        single,
        device="cpu",
    )
    report = _train_on_two_ranks(spec, tmp_path / "two")

    steps = [step for step, _, _ in report["points"]]
    assert steps == [p.step for p in single.points] == [5, 10, 15, 20, 25, 30, 35, 40]
    two = [loss for _, loss, _ in report["points"]]
    one = [p.loss for p in single.points]
    assert two == pytest.approx(one, rel=LOSS_RTOL)
    assert two[-1] < two[0]  # and it learns
    # Each rank measured its own images' losses per range of t; together, those of the whole batch.
    for (_, _, two_by_t), point in zip(report["points"], single.points, strict=True):
        assert [v is None for v in two_by_t] == [v is None for v in point.loss_by_t]
        assert [v for v in two_by_t if v is not None] == pytest.approx(
            [v for v in point.loss_by_t if v is not None], rel=LOSS_RTOL
        )
    # Rank 0 wrote the checkpoints; the weights it saved are those of the single process to rounding.
    assert [step for step, _ in report["checkpoints"]] == [22, 40]
    ddp = load_state(Path(report["checkpoints"][-1][1]).with_suffix("").with_suffix(".state.safetensors"))
    ref = load_state(single.checkpoints[-1].state_path)
    for name, tensor in ref.model.items():
        assert ddp.model[name] == pytest.approx(tensor, abs=1e-4), name
    # The EMA (what is served) followed the same weights, update for update.
    assert ddp.ema["optimization_step"] == ref.ema["optimization_step"] == 40
    for ours, theirs in zip(ddp.ema["shadow_params"], ref.ema["shadow_params"], strict=True):
        assert ours == pytest.approx(theirs, abs=1e-4)


def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path: Path, spec: JobSpec) -> None:
    whole = _train_on_two_ranks(spec, tmp_path / "whole")
    halfway = Path(whole["checkpoints"][0][1])
    assert halfway.name == "step-00000022.safetensors"
    resumed = _train_on_two_ranks(spec, tmp_path / "resumed", resume_from=halfway)
    assert [step for step, _, _ in resumed["points"]] == [25, 30, 35, 40]
    # Bit for bit, loss_by_t included: same shards, same reduction order, and the window of step
    # 25 (steps 21-25) carried over the resume at 22 by rank 0's checkpoint.
    assert resumed["points"] == whole["points"][4:]


def test_the_group_is_destroyed_only_after_the_ddp_modules_left_in_reference_cycles_are_freed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """train() leaves the job's DDP module (whose reducer holds the group) in reference cycles.
    Left to the interpreter's exit, the group's teardown aborted a gloo rank now and then
    (SIGABRT), so leaving the group frees such modules before it destroys the group."""
    alive_at_destroy: list[bool] = []
    destroy = dist.destroy_process_group

    def destroy_and_record() -> None:
        alive_at_destroy.append(module() is not None)
        destroy()

    monkeypatch.setattr(dist, "destroy_process_group", destroy_and_record)
    threads = torch.get_num_threads()
    gc.disable()  # no automatic collection may free the cycle by chance
    try:
        with process_group(Ranks(), "cpu", f"tcp://127.0.0.1:{free_port()}", timeout_s=60):
            cycle: list[Any] = [DistributedDataParallel(torch.nn.Linear(2, 2))]
            cycle.append(cycle)
            module = weakref.ref(cycle[0])
            del cycle
            assert module() is not None, "only a collection frees a cycle"
    finally:
        gc.enable()
        torch.set_num_threads(threads)
    assert alive_at_destroy == [False]
