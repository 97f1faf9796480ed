"""``ddpm-train SPEC --out DIR``: train a job spec locally, without the service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from app.spec import JobSpec
from app.spec_file import read_spec_document
from worker.ddpm.checkpoint import CheckpointError, load_unet, prune_checkpoints
from worker.ddpm.data import DatasetError
from worker.ddpm.sampling import sample_images, save_grid_png
from worker.ddpm.sink import MetricPoint, SavedCheckpoint, SavedSample
from worker.ddpm.trainer import NonFiniteLossError, resolve_device, train

app = typer.Typer(add_completion=False, help=__doc__)


@dataclass
class PrintingSink:
    """Prints progress; keeps only the newest `keep` checkpoints (the local run owns its directory)."""

    out: Path
    keep: int
    last: SavedCheckpoint | None = None

    def on_log(self, point: MetricPoint) -> None:
        typer.echo(
            f"step {point.step:>8d}  loss {point.loss:.5f}  lr {point.lr:.2e}  {point.images_per_s:,.0f} images/s"
        )

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        self.last = saved
        typer.echo(f"checkpoint {saved.path}  sha256 {saved.sha256}")
        prune_checkpoints(self.out, self.keep)

    def on_sample(self, saved: SavedSample) -> None:
        typer.echo(f"samples {saved.path}")


@app.command()
def run(
    spec_file: Annotated[Path, typer.Argument(help="Job spec, .json or .yaml.", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="Directory for checkpoints and samples.png.")],
    resume: Annotated[Path | None, typer.Option("--resume", help="A step-XXXXXXXX.safetensors to continue.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if any)")] = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Images in samples.png (0: none).")] = 16,
) -> None:
    """Train SPEC_FILE, printing one line per metric point and checkpoint; then write DIR/samples.png."""
    try:
        # Read as `ddpm submit` reads it, so the same file is the same spec here and in the service.
        spec = JobSpec.model_validate(read_spec_document(spec_file))
        sink = PrintingSink(out=out, keep=spec.training.keep_checkpoints)
        result = train(spec, out, sink, resume_from=resume, device=device)
    except (ValidationError, ValueError, DatasetError, CheckpointError, NonFiniteLossError) as e:
        typer.echo(f"ddpm-train: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(f"done at step {result.final_step}, last loss {result.last_loss}")
    final = sink.last.path if sink.last else resume
    if samples and final is not None:
        dev = resolve_device(device)
        images = sample_images(load_unet(final, dev), spec, samples, seed=spec.training.seed, device=dev)
        save_grid_png(images, out / "samples.png")
        typer.echo(f"samples {out / 'samples.png'}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``ddpm-train``)."""
    app(args=argv, prog_name="ddpm-train")
