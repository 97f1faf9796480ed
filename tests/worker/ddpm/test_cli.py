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
        spec_file.write_text(json.dumps(SPEC))
        out = tmp_path / "out"
        result = runner.invoke(app, [str(spec_file), "--out", str(out), "--device", "cpu", "--samples", "4"])
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert [int(m.group(1)) for line in lines if (m := re.match(r"step +(\d+) +loss [\d.]+ +lr ", line))] == [2, 4]
        checkpoints = [line.split() for line in lines if line.startswith("checkpoint ")]
        assert [Path(c[1]).name for c in checkpoints] == [f"step-{s:08d}.safetensors" for s in (1, 2, 3, 4)]
        assert checkpoints[-1][3] == sha256_file(checkpoints[-1][1])
        # keep_checkpoints=2: older pairs pruned
        assert sorted(p.name for p in out.iterdir()) == [
            "samples",  # the spec's sample_every grids (default 500: the last step's alone)
            "samples.png",
            "step-00000003.safetensors",
            "step-00000003.state.safetensors",
            "step-00000004.safetensors",
            "step-00000004.state.safetensors",
        ]
        with Image.open(out / "samples.png") as grid:
            assert grid.size == (19, 19)
        assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000004.png"]
        assert f"samples {out / 'samples' / 'step-00000004.png'}" in lines

    def test_yaml_spec_and_resume(self, tmp_path: Path, runner: CliRunner) -> None:
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(SPEC | {"training": SPEC["training"] | {"steps": 2}}))
        out = tmp_path / "out"
        first = runner.invoke(app, [str(spec_file), "--out", str(out), "--device", "cpu", "--samples", "0"])
        assert first.exit_code == 0, first.output
        assert not (out / "samples.png").exists()

        spec_file.write_text(yaml.safe_dump(SPEC))
        resume = out / "step-00000002.safetensors"
        args = [str(spec_file), "--out", str(out), "--resume", str(resume), "--device", "cpu", "--samples", "1"]
        second = runner.invoke(app, args)
        assert second.exit_code == 0, second.output
        assert "step        4" in second.output and "step        2" not in second.output
        assert (out / "samples.png").exists()

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
        assert "--resume" in capsys.readouterr().out
