"""The Makefile's virtualenv stamp: it is rebuilt when TORCH changes, and only then (or when
pyproject.toml does). Run on a copy of the Makefile with a stand-in `python` that records what
make asks of it, so nothing is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../calls.log"
"""
CPU = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
CUDA = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_venv_stamp_follows_torch(tmp_path: Path) -> None:
    shutil.copy2(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    log = venv / "calls.log"

    def make_venv(torch: str | None) -> list[str]:
        log.unlink(missing_ok=True)
        choice = [f"TORCH={torch}"] if torch is not None else []
        subprocess.run(["make", "-s", "venv", *choice], cwd=tmp_path, check=True, capture_output=True)
        return log.read_text().splitlines() if log.exists() else []

    first = make_venv(CPU)
    assert f"-m pip install -q {CPU}" in first
    assert "-m pip install -q -e .[worker,dev]" in first
    assert not any("uninstall" in call for call in first)  # nothing to replace yet
    assert (venv / ".torch").read_text() == CPU + "\n"
    assert make_venv(CPU) == []  # the same choice: nothing to do
    assert make_venv(None) == []  # no choice (`make run`, `make test`): the one made before

    switched = make_venv(CUDA)
    # The old build goes first: pip would take the installed 2.13.0+cpu as good enough for torch==2.13.0.
    assert switched.index("-m pip uninstall -q -y torch") < switched.index(f"-m pip install -q {CUDA}")
    assert (venv / ".torch").read_text() == CUDA + "\n"
    assert make_venv(CUDA) == []
    (venv / ".torch").unlink()  # a venv made before TORCH was recorded: PyPI's default build
    assert "-m pip install -q torch==2.13.0" in make_venv(None)
