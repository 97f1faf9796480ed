"""``ddpm-train SPEC --out DIR``: train a job spec locally, without the service."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from app.spec import JobSpec
from app.spec_file import read_spec_document
from worker.ddpm.checkpoint import CheckpointError, load_unet, prune_checkpoints
from worker.ddpm.data import DatasetError
from worker.ddpm.evaluation.cache import EvaluationSetup, FolderCache
from worker.ddpm.sampling import sample_images, save_grid_png
from worker.ddpm.sink import EvaluationPoint, MetricPoint, SavedCheckpoint, SavedSample, TrainingEvent, TrainResult
from worker.ddpm.step import StepOutOfMemoryError
from worker.ddpm.trainer import NonFiniteLossError, resolve_device, train

app = typer.Typer(add_completion=False, help=__doc__)

DEFAULT_SAMPLING_STEPS = 50  # DDIM steps for samples.png: seconds, where the DDPM chain takes T network calls


class Sampler(StrEnum):
    ddim = "ddim"
    ddpm = "ddpm"


@dataclass
class PrintingSink:
    """Prints progress; keeps only the newest `keep` checkpoints (the local run owns its directory)."""

    out: Path
    spec: JobSpec
    last: SavedCheckpoint | None = None
    points: int = 0  # metric points printed: none when there was nothing left to train

    def on_log(self, point: MetricPoint) -> None:
        self.points += 1
        steps = self.spec.training.steps
        efficiency = f"  MFU {point.mfu:.1%}" if point.mfu is not None else ""
        if point.peak_memory_bytes is not None:
            efficiency += f"  peak {point.peak_memory_bytes / 2**30:.2f} GiB"
        typer.echo(
            f"step {point.step:>{len(str(steps))}d}/{steps}  loss {point.loss:.5f}  lr {point.lr:.2e}  "
            f"{point.images_per_s:,.0f} images/s{efficiency}  ETA {self._eta(point)}"
        )

    def on_event(self, event: TrainingEvent) -> None:
        typer.echo(f"event {event.kind.value}: {event.message}")

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        self.last = saved
        typer.echo(f"checkpoint {saved.path}  sha256 {saved.sha256}")
        prune_checkpoints(self.out, self.spec.training.keep_checkpoints)

    def on_sample(self, saved: SavedSample) -> None:
        typer.echo(f"samples {saved.path}")

    def on_evaluation(self, point: EvaluationPoint) -> None:
        typer.echo(
            f"evaluation step {point.step}  FID {point.fid:.3f}  KID {point.kid:.5f} ± {point.kid_std:.5f}  "
            f"({point.samples} samples against {point.reference_images} training images, "
            f"{point.feature_network} features, {point.seconds:.1f} s)"
        )

    def _eta(self, point: MetricPoint) -> str:
        """The steps left at the throughput of the latest window (checkpoints and grids not counted)."""
        images_left = (self.spec.training.steps - point.step) * self.spec.training.batch_size
        if images_left <= 0:
            return "0:00:00"
        if not math.isfinite(point.images_per_s) or point.images_per_s <= 0:
            return "?"
        return str(timedelta(seconds=round(images_left / point.images_per_s)))


@app.command()
def run(
    spec_file: Annotated[Path, typer.Argument(help="Job spec, .json or .yaml.", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="Directory for checkpoints and samples.png.")],
    resume: Annotated[Path | None, typer.Option("--resume", help="A step-XXXXXXXX.safetensors to continue.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if any)")] = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Images in samples.png (0: none).")] = 16,
    sampler: Annotated[
        Sampler, typer.Option("--sampler", help="samples.png: ddim (--sampling-steps steps) or ddpm (all T steps).")
    ] = Sampler.ddim,
    sampling_steps: Annotated[
        int | None,
        typer.Option("--sampling-steps", min=1, help=f"DDIM steps for samples.png (default {DEFAULT_SAMPLING_STEPS})."),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            exists=True,
            dir_okay=False,
            help="dataset.kind 'dataset': its decoded images, a uint8 (N, C, S, S) .npy as the worker caches it "
            "(datasets/cache/<sha256>/<S>x<S>x<C>.npy under the checkpoint root).",
        ),
    ] = None,
    fid_weights: Annotated[
        Path | None,
        typer.Option(
            "--fid-weights",
            envvar="DDPM_FID_WEIGHTS",
            dir_okay=False,
            help="evaluation on images other than digits: the Inception TorchScript file (used only with its sha256).",
        ),
    ] = None,
    fid_weights_sha256: Annotated[
        str,
        typer.Option(
            "--fid-weights-sha256", envvar="DDPM_FID_WEIGHTS_SHA256", help="The sha256 --fid-weights must have."
        ),
    ] = "",
) -> None:
    """Train SPEC_FILE, printing one line per metric point, checkpoint and sample grid; then draw DIR/samples.png."""
    if sampler is Sampler.ddpm and sampling_steps is not None:
        raise typer.BadParameter("is for ddim; ddpm runs all T steps", param_hint="--sampling-steps")
    try:
        # Read as `ddpm submit` reads it, so the same file is the same spec here and in the service.
        spec = JobSpec.model_validate(read_spec_document(spec_file))
        sink = PrintingSink(out=out, spec=spec)
        # Reference statistics (and the digits classifier) are kept beside the run, for the next one.
        evaluation = EvaluationSetup(FolderCache(out / "evaluation"), fid_weights, fid_weights_sha256.lower())
        result = train(spec, out, sink, resume_from=resume, device=device, images_file=images, evaluation=evaluation)
    except (ValidationError, ValueError, DatasetError, CheckpointError, NonFiniteLossError, StepOutOfMemoryError) as e:
        typer.echo(f"ddpm-train: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(_summary(result, sink))
    final = sink.last.path if sink.last else resume
    if samples and final is not None:
        steps = spec.diffusion.timesteps if sampler is Sampler.ddpm else (sampling_steps or DEFAULT_SAMPLING_STEPS)
        _draw_samples(spec, final, out / "samples.png", samples, sampler, steps, device)


def _summary(result: TrainResult, sink: PrintingSink) -> str:
    steps = sink.spec.training.steps
    if sink.points == 0 or result.last_loss is None:  # a run that trained a step logged its last one
        return f"nothing to train: the checkpoint is already at step {result.final_step} of {steps}"
    return f"done at step {result.final_step} of {steps}, last loss {result.last_loss:.5f}"


def _draw_samples(
    spec: JobSpec, weights: Path, path: Path, count: int, sampler: Sampler, steps: int, device: str | None
) -> None:
    """`count` images from `weights` into one PNG grid, with a progress bar on stderr (on a terminal it
    moves; in a log it is printed once, when done)."""
    steps = min(steps, spec.diffusion.timesteps)
    typer.echo(f"drawing {count} images from {weights.name}: {sampler.value}, {steps} steps")
    dev = resolve_device(device)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(f"{sampler.value} steps", total=steps)
        images = sample_images(
            load_unet(weights, dev),
            spec,
            count,
            seed=spec.training.seed,
            device=dev,
            sampler=sampler.value,
            steps=steps,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    save_grid_png(images, path)
    typer.echo(f"samples {path}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``ddpm-train``)."""
    app(args=argv, prog_name="ddpm-train")
