"""Reading spec files: JSON as JSON, YAML with YAML 1.2's floats, errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.spec import JobSpec
from app.spec_file import SpecFileError, parse_spec_document, read_spec_document

SCIENTIFIC_YAML = """\
training:
  learning_rate: 2e-4
  weight_decay: 1E-2
  grad_clip: 1.5e3
  ema_decay: .5
  steps: 10
diffusion:
  beta_start: +1e-4
  beta_end: .2e-1
name: '1e3'
"""
SCIENTIFIC_JSON = {
    "training": {"learning_rate": 2e-4, "weight_decay": 1e-2, "grad_clip": 1.5e3, "ema_decay": 0.5, "steps": 10},
    "diffusion": {"beta_start": 1e-4, "beta_end": 0.02},
    "name": "1e3",
}


class TestYaml:
    def test_yaml_scientific_notation_is_a_float(self) -> None:
        text = "training:\n  learning_rate: 2e-4\n  beta: 1.5E+3\n  steps: 10\nname: '1e3'\n"
        spec = parse_spec_document(text, "s.yaml")
        assert spec == {"training": {"learning_rate": 2e-4, "beta": 1500.0, "steps": 10}, "name": "1e3"}

    def test_yaml_reads_as_its_json_equivalent(self) -> None:
        from_yaml = parse_spec_document(SCIENTIFIC_YAML, "s.yaml")
        assert from_yaml == parse_spec_document(json.dumps(SCIENTIFIC_JSON), "s.json") == SCIENTIFIC_JSON
        assert JobSpec.model_validate(from_yaml) == JobSpec.model_validate(SCIENTIFIC_JSON)

    @pytest.mark.parametrize(
        ("text", "value"),
        [("2e-4", 2e-4), ("1E5", 1e5), (".5", 0.5), (".5e3", 500.0), ("-1e-3", -1e-3), ("1.", 1.0), ("7", 7)],
    )
    def test_numbers(self, text: str, value: float) -> None:
        read = parse_spec_document(f"x: {text}", "s")["x"]
        assert (read, type(read)) == (value, type(value))

    @pytest.mark.parametrize("text", ["1e3x", "e5", "1e", "'2e-4'"])
    def test_not_numbers(self, text: str) -> None:
        assert isinstance(parse_spec_document(f"x: {text}", "s")["x"], str)


class TestJson:
    def test_json_and_empty(self) -> None:
        text = '{"training": {"learning_rate": 2e-4}}'
        assert parse_spec_document(text, "s.json") == {"training": {"learning_rate": 2e-4}}
        assert parse_spec_document("", "empty.yaml") == {}

    def test_tab_indented_json(self) -> None:
        text = json.dumps(SCIENTIFIC_JSON, indent="\t")  # not YAML: tabs cannot indent there
        assert parse_spec_document(text, "s.json") == SCIENTIFIC_JSON


class TestErrors:
    def test_not_a_mapping(self) -> None:
        with pytest.raises(SpecFileError, match=r"^stdin must hold a mapping \(the job spec\), not list$"):
            parse_spec_document("- a\n- b\n", "stdin")

    def test_broken_json_says_what_json_found(self) -> None:
        with pytest.raises(SpecFileError, match=r"^s.json is neither JSON nor YAML: Expecting ',' delimiter"):
            parse_spec_document('{"training": {"steps": 1 "batch_size": 2}}', "s.json")

    def test_broken_yaml_says_what_yaml_found(self) -> None:
        with pytest.raises(SpecFileError, match=r"^s.yaml is neither JSON nor YAML: while parsing"):
            parse_spec_document("training: [1, 2\n", "s.yaml")

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(SpecFileError, match=r"^cannot read .*nope.yaml: No such file or directory$"):
            read_spec_document(tmp_path / "nope.yaml")
