"""The local `ddpm-train` command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from app.files import sha256_file
from worker.ddpm.checkpoint import read_metadata
from worker.ddpm.cli import app, main

SPEC = {
    "dataset": {"image_size": 8},
    "model": {"preset": "custom", "channels": [16, 32], "norm_groups": 8},
    "diffusion": {"timesteps": 10},
    "training": {"steps": 4, "batch_size": 8, "log_every": 2, "checkpoint_every": 1, "keep_checkpoints": 2},
}


# The same spec twice: YAML with scientific notation that YAML 1.1 reads as strings, and JSON.
SCIENTIFIC_YAML = """\
dataset: {image_size: 8}
model: {preset: custom, channels: [16, 32], norm_groups: 8}
diffusion: {timesteps: 10, beta_start: 1e-4, beta_end: .2e-1}
training: {steps: 1, batch_size: 8, learning_rate: 2e-4, weight_decay: 1E-2, grad_clip: 1.5e3}
"""
SCIENTIFIC_JSON = {
    "dataset": {"image_size": 8},
    "model": {"preset": "custom", "channels": [16, 32], "norm_groups": 8},
    "diffusion": {"timesteps": 10, "beta_start": 0.0001, "beta_end": 0.02},
    "training": {"steps": 1, "batch_size": 8, "learning_rate": 0.0002, "weight_decay": 0.01, "grad_clip": 1500.0},
}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


class TestTrainCommand:
    def test_json_spec(self, tmp_path: Path, runner: CliRunner) -> None:
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps(SPEC | {"training": SPEC["training"] | {"sample_every": 2}}))
        out = tmp_path / "out"
        result = runner.invoke(app, [str(spec_file), "--out", str(out), "--device", "cpu", "--samples", "4"])
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        # A line per metric point: step of steps, loss, lr, throughput and the time left.
        progress = r"step +(\d+)/4 +loss [\d.]+ +lr [\d.e+-]+ +[\d,]+ images/s +ETA (\d+:\d\d:\d\d|\?)$"
        points = [m.groups() for line in lines if (m := re.match(progress, line))]
        assert [int(step) for step, _ in points] == [2, 4]
        assert points[-1][1] == "0:00:00"
        checkpoints = [line.split() for line in lines if line.startswith("checkpoint ")]
        assert [Path(c[1]).name for c in checkpoints] == [f"step-{s:08d}.safetensors" for s in (1, 2, 3, 4)]
        assert checkpoints[-1][3] == sha256_file(checkpoints[-1][1])
        # keep_checkpoints=2: older pairs pruned
        assert sorted(p.name for p in out.iterdir()) == [
            "samples",
            "samples.png",
            "step-00000003.safetensors",
            "step-00000003.state.safetensors",
            "step-00000004.safetensors",
            "step-00000004.state.safetensors",
        ]
        # sample_every=2: a grid at steps 2 and 4, each printed when drawn.
        assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
        grid_lines = [line for line in lines if line.startswith(f"samples {out / 'samples'}/")]
        assert grid_lines == [f"samples {out / 'samples' / f'step-0000000{s}.png'}" for s in (2, 4)]
        # samples.png: DDIM by default (its 50 steps capped at T=10), with a progress bar.
        assert re.search(r"done at step 4 of 4, last loss [\d.]+\n", result.output)
        assert "drawing 4 images from step-00000004.safetensors: ddim, 10 steps" in lines
        assert re.search(r"ddim steps .* 10/10", result.output)
        assert lines[-1] == f"samples {out / 'samples.png'}"
        with Image.open(out / "samples.png") as grid:
            assert grid.size == (19, 19)

    def test_yaml_spec_and_resume(self, tmp_path: Path, runner: CliRunner) -> None:
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(SPEC | {"training": SPEC["training"] | {"steps": 2}}))
        out = tmp_path / "out"
        first = runner.invoke(app, [str(spec_file), "--out", str(out), "--device", "cpu", "--samples", "0"])
        assert first.exit_code == 0, first.output
        assert not (out / "samples.png").exists() and "drawing" not in first.output

        spec_file.write_text(yaml.safe_dump(SPEC))
        resume = out / "step-00000002.safetensors"
        args = [str(spec_file), "--out", str(out), "--resume", str(resume), "--device", "cpu", "--samples", "1"]
        second = runner.invoke(app, [*args, "--sampling-steps", "3"])
        assert second.exit_code == 0, second.output
        assert "step 4/4" in second.output and "step 2/4" not in second.output
        assert "drawing 1 images from step-00000004.safetensors: ddim, 3 steps" in second.output
        assert (out / "samples.png").exists()

        # Resumed at the last step: nothing to train, and samples.png from the checkpoint given.
        (out / "samples.png").unlink()
        done = out / "step-00000004.safetensors"
        args = [str(spec_file), "--out", str(out), "--resume", str(done), "--device", "cpu", "--samples", "1"]
        third = runner.invoke(app, [*args, "--sampler", "ddpm"])
        assert third.exit_code == 0, third.output
        assert third.output.splitlines()[0] == "nothing to train: the checkpoint is already at step 4 of 4"
        assert "None" not in third.output and "step 4/4" not in third.output
        assert "drawing 1 images from step-00000004.safetensors: ddpm, 10 steps" in third.output
        assert (out / "samples.png").exists()

    def test_sampling_steps_are_for_ddim(self, tmp_path: Path, runner: CliRunner) -> None:
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps(SPEC))
        args = [str(spec_file), "--out", str(tmp_path / "out"), "--sampler", "ddpm", "--sampling-steps", "5"]
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert "--sampling-steps" in result.output and "ddpm runs all T steps" in result.output
        assert not (tmp_path / "out").exists()  # refused before training

    def test_yaml_scientific_notation_trains_the_json_equivalent(self, tmp_path: Path, runner: CliRunner) -> None:
        # PyYAML alone reads `2e-4` as a string, which the strict spec refused; `ddpm submit` did not.
        (tmp_path / "spec.yaml").write_text(SCIENTIFIC_YAML)
        (tmp_path / "spec.json").write_text(json.dumps(SCIENTIFIC_JSON))
        trained = []
        for name in ("spec.yaml", "spec.json"):
            out = tmp_path / name.replace(".", "-")
            result = runner.invoke(app, [str(tmp_path / name), "--out", str(out), "--device", "cpu", "--samples", "0"])
            assert result.exit_code == 0, result.output
            trained.append(json.loads(read_metadata(out / "step-00000001.safetensors")["spec"]))
        assert trained[0] == trained[1]
        assert trained[0]["training"]["learning_rate"] == 2e-4 and trained[0]["diffusion"]["beta_end"] == 0.02

    def test_evaluation_lines_and_its_cache_beside_the_run(self, tmp_path: Path, runner: CliRunner) -> None:
        spec_file, out = tmp_path / "spec.json", tmp_path / "out"
        spec_file.write_text(json.dumps(SPEC | {"evaluation": {"every": 2, "samples": 8, "steps": 2}}))
        result = runner.invoke(app, [str(spec_file), "--out", str(out), "--device", "cpu", "--samples", "0"])
        assert result.exit_code == 0, result.output
        evaluation = (
            r"evaluation step (\d) +FID [\d.]+ +KID -?[\d.]+ ± [\d.]+ +"
            r"\(8 samples against 1797 training images, digits-classifier features, [\d.]+ s\)$"
        )
        assert [m[1] for line in result.output.splitlines() if (m := re.match(evaluation, line))] == ["2", "4"]
        cached = sorted(str(p.relative_to(out / "evaluation")) for p in (out / "evaluation").rglob("*.*"))
        assert cached[:2] == ["networks/digits-classifier-v1.pt", "networks/digits-classifier-v1.pt.sha256"]
        assert len(cached) == 3 and re.fullmatch(r"reference/[0-9a-f]{64}-[0-9a-f]{16}\.npz", cached[2])

    def test_bad_dataset_is_a_clean_error(self, tmp_path: Path, runner: CliRunner) -> None:
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps({"dataset": {"kind": "folder", "path": str(tmp_path / "missing")}}))
        result = runner.invoke(app, [str(spec_file), "--out", str(tmp_path / "out")])
        assert result.exit_code == 1
        assert "missing does not exist" in result.output

    def test_invalid_spec_is_a_clean_error(self, tmp_path: Path, runner: CliRunner) -> None:
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps({"training": {"stepz": 3}}))
        result = runner.invoke(app, [str(spec_file), "--out", str(tmp_path / "out")])
        assert result.exit_code == 1 and "stepz" in result.output

    def test_main_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
        help_text = capsys.readouterr().out
        assert all(option in help_text for option in ("--resume", "--sampler", "--sampling-steps"))
