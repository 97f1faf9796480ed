"""Benchmark: which diffusion recipe trains best on digits at one fixed budget.

Twelve recipes: what the U-Net predicts (`x0`, `eps`, `v`) x the loss weighting (`none`, `min_snr`
with gamma 5, Hang et al. 2023) x the noise schedule (`linear`, Ho et al. 2020; `cosine`, Nichol &
Dhariwal 2021). Each trains `tiny` on the built-in digits (8x8, batch 64) for the same steps from the
same seed with `train()` itself, and is evaluated once, at its last step, by the project's own
evaluation: FID and KID of `--samples` images drawn from the EMA weights (DPM-Solver++ 2M, 20 network
calls) against the training set, in the features of the digits classifier. One evaluation cache
folder serves every run, so the classifier and the reference statistics are computed once.

The table is sorted by FID (lower is better). Losses are not comparable across recipes: each
prediction has its own target, and `min_snr` reports its weighted loss. With `--seeds N` a recipe's
figures are means over seeds 0..N-1 (and FID's spread is shown). `--json PATH` is rewritten after
every run, so a run cut short still reports what it finished.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.spec import JobSpec
from bench.common import default_threads, machine, torch_threads
from worker.ddpm.sink import EvaluationPoint, MetricPoint, SavedCheckpoint, SavedSample, TrainingEvent

PREDICTIONS = ("x0", "eps", "v")
SCHEDULES = ("linear", "cosine")
WEIGHTINGS = ("none", "min_snr")

# Chosen so that the twelve recipes take about 10-12 minutes on the 2-core CPU (BENCHMARKS.md).
DEFAULT_STEPS = 400
DEFAULT_SAMPLES = 1000
SHORT = {"steps": 4, "samples": 32, "only": ("x0/linear/none", "eps/cosine/min_snr")}  # proves it runs (CI)
EVALUATION_SAMPLER = {"sampler": "dpm++", "steps": 20}


@dataclass(frozen=True)
class Recipe:
    prediction: str
    beta_schedule: str
    loss_weighting: str

    @property
    def name(self) -> str:
        return f"{self.prediction}/{self.beta_schedule}/{self.loss_weighting}"

    @property
    def is_default(self) -> bool:
        """What a job gets when it says nothing (app/spec.py's DiffusionSpec defaults)."""
        return self == DEFAULT_RECIPE


RECIPES = tuple(Recipe(*r) for r in itertools.product(PREDICTIONS, SCHEDULES, WEIGHTINGS))
DEFAULT_RECIPE = Recipe("x0", "linear", "none")


def select(only: list[str] | tuple[str, ...] | None) -> list[Recipe]:
    """The recipes named in `only` (as `prediction/schedule/weighting`), in table order; all when None."""
    if not only:
        return list(RECIPES)
    by_name = {r.name: r for r in RECIPES}
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise ValueError(f"--only: unknown recipe(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [r for r in RECIPES if r.name in only]


def make_spec(recipe: Recipe, steps: int, samples: int, seed: int) -> JobSpec:
    """`tiny` on digits at 8x8, batch 64; one checkpoint and one evaluation, both at the last step."""
    return JobSpec.model_validate(
        {
            "dataset": {"kind": "digits"},
            "model": {"preset": "tiny"},
            "diffusion": {
                "prediction": recipe.prediction,
                "beta_schedule": recipe.beta_schedule,
                "loss_weighting": recipe.loss_weighting,
                "min_snr_gamma": 5.0,
            },
            "training": {
                "steps": steps,
                "seed": seed,
                "log_every": min(10, steps),
                "checkpoint_every": steps,
                "sample_every": 0,
            },
            "evaluation": {"every": steps, "samples": samples, **EVALUATION_SAMPLER},
        }
    )


class _Recorder:
    """A sink that keeps the metric points and the evaluation."""

    def __init__(self) -> None:
        self.points: list[MetricPoint] = []
        self.evaluations: list[EvaluationPoint] = []

    def on_log(self, point: MetricPoint) -> None:
        self.points.append(point)

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        pass

    def on_sample(self, saved: SavedSample) -> None:
        pass

    def on_evaluation(self, point: EvaluationPoint) -> None:
        self.evaluations.append(point)

    def on_event(self, event: TrainingEvent) -> None:
        print(f"   event: {event.message}")


def train_and_evaluate(recipe: Recipe, steps: int, samples: int, seed: int, cache_dir: Path, device: str) -> dict:
    """One recipe, one seed: its final FID/KID, final loss, median images/s, evaluation seconds."""
    from worker.ddpm.evaluation.cache import EvaluationSetup, FolderCache
    from worker.ddpm.trainer import train

    recorder = _Recorder()
    cold = not any(cache_dir.iterdir())  # this run trains the classifier and computes the reference statistics
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as folder:
        evaluation = EvaluationSetup(FolderCache(cache_dir))
        train(make_spec(recipe, steps, samples, seed), Path(folder), recorder, device=device, evaluation=evaluation)
    seconds = time.perf_counter() - start
    if not recorder.evaluations:
        raise RuntimeError(f"{recipe.name}: training ended without an evaluation")
    final = recorder.evaluations[-1]
    return {
        "recipe": recipe.name,
        **asdict(recipe),
        "default": recipe.is_default,
        "seed": seed,
        "fid": final.fid,
        "kid": final.kid,
        "kid_std": final.kid_std,
        "samples": final.samples,
        "reference_images": final.reference_images,
        "feature_network": final.feature_network,
        "evaluation_seconds": final.seconds,
        "loss": recorder.points[-1].loss,
        "images_per_s": statistics.median(p.images_per_s for p in recorder.points),
        "seconds": seconds,
        "cold_cache": cold,
    }


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _figures(r: dict) -> str:
    return (
        f"FID {r['fid']:.2f}, KID {r['kid']:.4g}, loss {r['loss']:.4f}, {r['images_per_s']:.0f} images/s, "
        f"evaluation {r['evaluation_seconds']:.1f} s, run {r['seconds']:.0f} s"
    )


def summarise(runs: list[dict]) -> list[dict]:
    """One row per recipe (means over its seeds), sorted by FID; a recipe without a finite FID goes last."""
    rows = []
    for name in dict.fromkeys(r["recipe"] for r in runs):
        mine = [r for r in runs if r["recipe"] == name]
        fids = [r["fid"] for r in mine]
        rows.append(
            {
                "recipe": name,
                "default": mine[0]["default"],
                "seeds": [r["seed"] for r in mine],
                "fid": _mean(fids),
                "fid_std": statistics.stdev(fids) if len(fids) > 1 else None,
                "kid": _mean([r["kid"] for r in mine]),
                "loss": _mean([r["loss"] for r in mine]),
                "images_per_s": _mean([r["images_per_s"] for r in mine]),
                "evaluation_seconds": _mean([r["evaluation_seconds"] for r in mine]),
                "seconds": _mean([r["seconds"] for r in mine]),
            }
        )
    return sorted(rows, key=lambda row: (not math.isfinite(row["fid"]), row["fid"]))


def table(rows: list[dict]) -> str:
    """The markdown table of `summarise`'s rows."""
    lines = [
        "| rank | recipe (prediction/schedule/weighting) | FID | KID | final loss | images/s | evaluation s | run s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rank, row in enumerate(rows, 1):
        name = f"**{row['recipe']}** (default)" if row["default"] else row["recipe"]
        fid = f"{row['fid']:.2f}" + (f" ± {row['fid_std']:.2f}" if row["fid_std"] is not None else "")
        lines.append(
            f"| {rank} | {name} | {fid} | {row['kid']:.4g} | {row['loss']:.4f} | {row['images_per_s']:.0f} | "
            f"{row['evaluation_seconds']:.1f} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines)


def command_line(steps: int, samples: int, seeds: int, only: list[str] | None, json_path: str | None) -> str:
    """The command that reproduces this table."""
    words = ["python -m bench recipes", f"--steps {steps}", f"--samples {samples}", f"--seeds {seeds}"]
    if only:
        words.append(f"--only {','.join(only)}")
    if json_path:
        words.append(f"--json {json_path}")
    return " ".join(words)


@contextlib.contextmanager
def _cache_folder(cache_dir: str | None) -> Iterator[Path]:
    """`cache_dir` (kept: a later run reuses its classifier and statistics), else a folder for this run."""
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        yield Path(cache_dir)
        return
    with tempfile.TemporaryDirectory(prefix="bench-recipes-cache-") as folder:
        yield Path(folder)


def _write_json(path: str | None, results: dict) -> None:
    """Replace `path` whole (a reader never sees half a file)."""
    if path is None:
        return
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(results, indent=2))
    os.replace(partial, target)


def run(
    short: bool = False,
    device: str | None = None,
    threads: int | None = None,
    *,
    steps: int | None = None,
    samples: int | None = None,
    seeds: int = 1,
    only: list[str] | None = None,
    json_path: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate the selected recipes (each over `seeds` seeds); print and return the table."""
    from worker.ddpm.trainer import resolve_device

    steps = steps or (SHORT["steps"] if short else DEFAULT_STEPS)
    samples = samples or (SHORT["samples"] if short else DEFAULT_SAMPLES)
    only = only or (list(SHORT["only"]) if short else None)
    recipes = select(only)
    dev = resolve_device(device)
    threads = threads or default_threads(dev.type)
    command = command_line(steps, samples, seeds, only, json_path)
    results: dict[str, Any] = {"command": command, "machine": machine(), "device": dev.type, "threads": threads}
    print(f"== recipes: {len(recipes)} recipes x {seeds} seed(s) on digits, FID at step {steps}")
    print(f"   {results['machine']}\n   {command}  ({dev.type}, {threads} threads)", flush=True)
    results |= {"steps": steps, "samples": samples, "sampler": EVALUATION_SAMPLER, "complete": False}
    runs: list[dict] = []
    with _cache_folder(cache_dir) as cache, torch_threads(threads):
        for seed, recipe in itertools.product(range(seeds), recipes):  # every recipe once before any twice
            r = train_and_evaluate(recipe, steps, samples, seed, cache, str(dev))
            runs.append(r)
            print(f"-- {recipe.name} seed {seed}: {_figures(r)}", flush=True)
            results |= {"runs": runs, "table": summarise(runs)}
            _write_json(json_path, results)
    results["complete"] = True
    _write_json(json_path, results)
    print(
        f"\n`{command}`\n{results['machine']}; {runs[-1]['feature_network']} features of {samples} samples "
        f"(DPM-Solver++ 2M, 20 steps) against {runs[-1]['reference_images']} training images; tiny, 8x8, batch 64, "
        f"{steps} steps; the default recipe is {DEFAULT_RECIPE.name}.\n"
    )
    print(table(results["table"]))
    if runs[0]["cold_cache"]:
        print(f"\n{runs[0]['recipe']}'s run s include training the classifier and the reference statistics.")
    return results
