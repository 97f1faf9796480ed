"""Training on a user's data set (its decoded .npy): on the device or streamed from the host, the
same batches and the same losses; random horizontal flips, deterministic and resumable."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from app.spec import DatasetSpec, JobSpec
from worker.ddpm.cli import app
from worker.ddpm.data import BatchIndexer, DatasetError, DeviceBatches, HostBatches, load_images
from worker.ddpm.distributed import Ranks, free_port, process_group, spawn_ranks
from worker.ddpm.trainer import _NoisyBatches, flip_horizontally, random_flips, train

SpecFactory = Callable[..., JobSpec]
IMAGES = 20  # batch 8: the third step already crosses into the second epoch


@pytest.fixture
def images_file(tmp_path: Path) -> Path:
    """A decoded data set as worker/datasets/cache.py writes it: uint8 (N, 3, 8, 8), np.save format."""
    path = tmp_path / "8x8x3.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (IMAGES, 3, 8, 8), dtype=np.uint8))
    return path


def dataset_spec(tiny_spec: SpecFactory, random_flip: bool = False, **training: Any) -> JobSpec:
    dataset = {"kind": "dataset", "id": str(uuid.uuid4()), "channels": 3, "random_flip": random_flip}
    return tiny_spec(dataset=dataset, training=training)


def losses(sink: Any) -> list[tuple[int, float]]:
    return [(p.step, p.loss) for p in sink.points]


class TestLoadImages:
    def test_the_array_memory_mapped(self, images_file: Path) -> None:
        images = load_images(DatasetSpec(kind="dataset", id=str(uuid.uuid4()), channels=3), images_file)
        assert images.shape == (IMAGES, 3, 8, 8) and images.dtype == torch.uint8
        assert torch.equal(images, torch.from_numpy(np.load(images_file)))

    def test_a_shape_other_than_the_spec_says(self, images_file: Path) -> None:
        spec = DatasetSpec(kind="dataset", id=str(uuid.uuid4()), image_size=16, channels=3)
        with pytest.raises(DatasetError, match=r"hold uint8 \(20, 3, 8, 8\); expected uint8 \(N, 3, 16, 16\)"):
            load_images(spec, images_file)

    def test_not_uint8(self, tmp_path: Path) -> None:
        np.save(tmp_path / "f.npy", np.zeros((2, 1, 8, 8), dtype=np.float32))
        with pytest.raises(DatasetError, match=r"hold float32"):
            load_images(DatasetSpec(kind="dataset", id=str(uuid.uuid4())), tmp_path / "f.npy")

    def test_not_an_array_file(self, tmp_path: Path) -> None:
        (tmp_path / "f.npy").write_bytes(b"not numpy at all")
        with pytest.raises(DatasetError, match=r"cannot read the training images .*f\.npy"):
            load_images(DatasetSpec(kind="dataset", id=str(uuid.uuid4())), tmp_path / "f.npy")

    def test_without_the_file(self) -> None:
        dataset_id = str(uuid.uuid4())
        with pytest.raises(DatasetError, match=rf"data set {dataset_id} .*--images FILE\.npy"):
            load_images(DatasetSpec(kind="dataset", id=dataset_id))

    def test_a_file_for_another_kind(self, images_file: Path) -> None:
        with pytest.raises(DatasetError, match=r"only for dataset\.kind 'dataset', not 'digits'"):
            load_images(DatasetSpec(), images_file)


class TestHostBatches:
    @pytest.mark.parametrize("ranks", [Ranks(), Ranks(1, 2)])
    def test_same_images_as_on_the_device(self, images_file: Path, ranks: Ranks) -> None:
        images = torch.from_numpy(np.load(images_file))
        host = HostBatches(
            load_images(DatasetSpec(kind="dataset", id=str(uuid.uuid4()), channels=3), images_file),
            BatchIndexer(IMAGES, 8, seed=3),
            torch.device("cpu"),
            ranks.share,
        )
        device = DeviceBatches(images.clone(), BatchIndexer(IMAGES, 8, seed=3), ranks.share)
        try:
            for step in [0, 1, 2, 3, 7, 6, 6, 0]:  # in order, then jumps back and forth
                got = host.batch(step)
                assert got.shape == (8 // ranks.world_size, 3, 8, 8)
                assert torch.equal(got, device.batch(step))
                assert torch.equal(got, images[ranks.share(BatchIndexer(IMAGES, 8, seed=3).indices(step))])
        finally:
            host.close()

    def test_refuses_images_on_a_device(self) -> None:
        with pytest.raises(ValueError, match="host tensor"):
            HostBatches(
                torch.zeros(2, 1, 8, 8, dtype=torch.uint8, device="meta"), BatchIndexer(2, 1, 0), torch.device("cpu")
            )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestOnCuda:
    """The pinned double buffer and side-stream copies (runs where there is a GPU)."""

    def test_same_batches_as_on_the_device(self, images_file: Path) -> None:
        images, dev = torch.from_numpy(np.load(images_file)), torch.device("cuda")
        host = HostBatches(images, BatchIndexer(IMAGES, 8, seed=3), dev)
        device = DeviceBatches(images.to(dev), BatchIndexer(IMAGES, 8, seed=3, device=dev))
        seen = []
        for step in [0, 1, 2, 3, 4, 5, 9, 8, 8, 0]:
            got = host.batch(step)
            seen.append(got.float().sum())  # read on the training stream, as the trainer reads it
            assert torch.equal(got, device.batch(step))
        assert len(seen) == 10

    def test_same_losses_as_on_the_device(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, images_file: Path
    ) -> None:
        spec = dataset_spec(tiny_spec, random_flip=True, steps=8, compile="off")
        on_device, streamed = make_sink(), make_sink()
        train(spec, tmp_path / "a", on_device, device="cuda", images_file=images_file, data_on_device=True)
        train(spec, tmp_path / "b", streamed, device="cuda", images_file=images_file, data_on_device=False)
        # The same batches (above, exactly); cuDNN's autotuner may pick other kernels per run: rounding.
        assert [p.step for p in streamed.points] == [p.step for p in on_device.points]
        assert [p.loss for p in streamed.points] == pytest.approx([p.loss for p in on_device.points], rel=1e-3)


class TestStreamedTraining:
    def test_same_losses_and_weights_as_on_the_device(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, images_file: Path
    ) -> None:
        spec = dataset_spec(tiny_spec, steps=5, checkpoint_every=5)
        on_device, streamed = make_sink(), make_sink()
        train(spec, tmp_path / "a", on_device, device="cpu", images_file=images_file, data_on_device=True)
        train(spec, tmp_path / "b", streamed, device="cpu", images_file=images_file, data_on_device=False)
        assert len(streamed.points) == 5
        assert losses(streamed) == losses(on_device)
        assert streamed.checkpoints[-1].sha256 == on_device.checkpoints[-1].sha256

    def test_resume_with_random_flips_is_exact(
        self, tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, images_file: Path
    ) -> None:
        spec = dataset_spec(tiny_spec, random_flip=True, steps=6, checkpoint_every=3)
        whole = make_sink()
        train(spec, tmp_path / "whole", whole, device="cpu", images_file=images_file, data_on_device=False)
        first = make_sink(stop_on_checkpoint_at=3)
        stopped = train(spec, tmp_path / "split", first, device="cpu", images_file=images_file, data_on_device=False)
        assert stopped.stopped
        second = make_sink()
        resume = first.checkpoints[-1].path
        train(spec, tmp_path / "split", second, device="cpu", images_file=images_file, resume_from=resume)
        assert losses(first) + losses(second) == losses(whole)
        end_whole, end_split = load_file(whole.checkpoints[-1].path), load_file(second.checkpoints[-1].path)
        assert all(torch.equal(end_whole[k], end_split[k]) for k in end_whole)

        unflipped = make_sink()
        no_flips = dataset_spec(tiny_spec, steps=6, checkpoint_every=3)
        train(no_flips, tmp_path / "plain", unflipped, device="cpu", images_file=images_file)
        assert losses(unflipped)[0] != losses(whole)[0], "the flips change what is trained on"


class TestRandomFlips:
    def test_about_half_and_a_function_of_the_seed(self) -> None:
        a = random_flips(10_000, torch.Generator().manual_seed(5), torch.device("cpu"))
        b = random_flips(10_000, torch.Generator().manual_seed(5), torch.device("cpu"))
        assert a.dtype == torch.bool and torch.equal(a, b)
        assert 0.48 < a.float().mean().item() < 0.52  # 1/2, within 4 standard deviations (0.005)
        assert not torch.equal(a, random_flips(10_000, torch.Generator().manual_seed(6), torch.device("cpu")))

    def test_mirrors_exactly_the_chosen_images(self) -> None:
        x0 = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
        flipped = flip_horizontally(x0, torch.tensor([True, False]))
        assert flipped[0].tolist() == [[[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]]
        assert torch.equal(flipped[1], x0[1])

    @pytest.mark.parametrize("random_flip", [False, True])
    def test_the_batch_drawn(self, tiny_spec: SpecFactory, images_file: Path, random_flip: bool) -> None:
        """x_t of a step, against the same numbers drawn by hand: t, eps, then (only with flips on)
        the flips, from the noise stream; so a job without flips draws just what it always did."""
        spec = dataset_spec(tiny_spec, random_flip=random_flip)
        dev, noise = torch.device("cpu"), torch.Generator().manual_seed(11)
        with _NoisyBatches(spec, dev, Ranks(), images_file, on_device=False) as data:
            x_t, t, _ = data.draw(2, noise)
            x0 = data.images.batch(1).float() / 127.5 - 1.0  # (B, C, H, W)
            schedule = data.schedule
        reference = torch.Generator().manual_seed(11)
        t_ref = torch.randint(0, spec.diffusion.timesteps, (8,), generator=reference)
        eps = torch.randn((8, 3, 8, 8), generator=reference)
        if random_flip:
            flips = torch.rand((8,), generator=reference) < 0.5
            x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
        assert torch.equal(t, t_ref)
        assert torch.equal(x_t, schedule.add_noise(x0, eps, t_ref))
        assert torch.equal(noise.get_state(), reference.get_state())  # nothing else drawn


CLI_SPEC = {
    "dataset": {"kind": "dataset", "id": "8d0f3c6e-2f6b-4c57-9d7e-4f3a5c1b2e10", "image_size": 8, "channels": 3},
    "model": {"preset": "custom", "channels": [16, 32], "norm_groups": 8},
    "diffusion": {"timesteps": 10},
    "training": {"steps": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 2},
}


class TestTrainCommand:
    """ddpm-train on a `dataset` spec: with the decoded images given (--images), or a clear refusal."""

    def test_with_the_images(self, tmp_path: Path, images_file: Path) -> None:
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps(CLI_SPEC))
        args = [str(spec_file), "--out", str(tmp_path / "out"), "--device", "cpu", "--samples", "0"]
        result = CliRunner().invoke(app, [*args, "--images", str(images_file)])
        assert result.exit_code == 0, result.output
        assert "done at step 2 of 2" in result.output

    def test_without_them(self, tmp_path: Path) -> None:
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps(CLI_SPEC))
        result = CliRunner().invoke(app, [str(spec_file), "--out", str(tmp_path / "out"), "--device", "cpu"])
        assert result.exit_code == 1
        assert "data set 8d0f3c6e-2f6b-4c57-9d7e-4f3a5c1b2e10 is trained from its decoded images file" in result.output
        assert "--images FILE.npy" in result.output


def _streamed_rank(rank: int, spec_json: str, images: str, out: str, init_method: str) -> None:
    """One of two ranks (gloo) training host-streamed; rank 0 writes its metric points to report.json."""
    ranks = Ranks(rank, 2)
    points: list[list[float]] = []

    class Sink:
        def on_log(self, point: Any) -> None:
            points.append([point.step, point.loss])

        def on_checkpoint(self, saved: Any) -> None:
            pass

    spec = JobSpec.model_validate_json(spec_json)
    with process_group(ranks, "cpu", init_method, timeout_s=60):
        train(
            spec,
            Path(out) / f"rank-{rank}",
            Sink(),
            device="cpu",
            ranks=ranks,
            images_file=Path(images),
            data_on_device=False,
        )
    if ranks.is_main:
        (Path(out) / "report.json").write_text(json.dumps(points))


@pytest.mark.slow
def test_two_ranks_streaming_their_shares_match_one_process(
    tmp_path: Path, tiny_spec: SpecFactory, make_sink: Any, images_file: Path
) -> None:
    """Each rank gathers only its half of every global batch (and of its flips): the loss curve is
    the single process's, to the rounding of tests/worker/ddpm/test_distributed.py."""
    spec = dataset_spec(tiny_spec, random_flip=True, steps=6, log_every=2, checkpoint_every=6)
    single = make_sink()
    train(spec, tmp_path / "one", single, device="cpu", images_file=images_file, data_on_device=False)
    two_gpus = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpus": 2})})
    args = (two_gpus.model_dump_json(), str(images_file), str(tmp_path), f"tcp://127.0.0.1:{free_port()}")
    context = spawn_ranks(_streamed_rank, args, 2)
    while not context.join(timeout=120):
        pass
    report = json.loads((tmp_path / "report.json").read_text())
    assert [step for step, _ in report] == [p.step for p in single.points] == [2, 4, 6]
    assert [loss for _, loss in report] == pytest.approx([p.loss for p in single.points], rel=1e-5)
