"""bench/gpu.py without a GPU: the report written as it goes, the budget, and (slow) the sections'
orchestration at tiny sizes on the CPU."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import gpu
from bench.__main__ import main


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


class TestReport:
    def test_each_section_is_on_disk_before_the_next_starts(self, tmp_path: Path) -> None:
        path, clock = tmp_path / "out.json", _Clock()
        report = gpu.Report(path, budget_s=100, clock=clock)
        assert _read(path)["sections"] == {} and not _read(path)["complete"]

        def first(note: gpu.Note) -> dict[str, Any]:
            note("run 1", {"images_per_s": 10.0})
            assert _read(path)["sections"]["first"] == {
                "status": "running",
                "partial": {"run 1": {"images_per_s": 10.0}},
            }
            clock.now += 3
            return {"images_per_s": 12.5, "checks": {"finite": True}}

        def second(note: gpu.Note) -> dict[str, Any]:
            on_disk = _read(path)["sections"]
            assert on_disk["first"] == {
                "status": "ok",
                "failed_checks": [],
                "images_per_s": 12.5,
                "checks": {"finite": True},
                "seconds": 3,
            }
            return {}

        report.section("first", first)
        report.section("second", second)
        assert _read(path)["sections"]["second"]["status"] == "ok"
        clock.now = 7
        report.finish()
        assert _read(path)["complete"] and _read(path)["seconds"] == 7
        assert not (tmp_path / "out.json.tmp").exists()

    def test_a_section_that_raises_is_recorded_and_the_next_runs(self, tmp_path: Path) -> None:
        path = tmp_path / "out.json"
        report = gpu.Report(path, budget_s=100, clock=_Clock())

        def broken(note: gpu.Note) -> dict[str, Any]:
            note("before", 1)
            raise RuntimeError("CUDA error: out of memory")

        report.section("broken", broken)
        report.section("after", lambda note: {"value": 2})
        sections = _read(path)["sections"]
        assert sections["broken"]["status"] == "failed"
        assert sections["broken"]["error"] == "RuntimeError: CUDA error: out of memory"
        assert sections["broken"]["partial"] == {"before": 1} and "Traceback" in sections["broken"]["traceback"]
        assert sections["after"] == {"status": "ok", "failed_checks": [], "value": 2, "seconds": 0}

    def test_a_failed_check_keeps_the_figures(self, tmp_path: Path) -> None:
        report = gpu.Report(None, budget_s=100, clock=_Clock())
        entry = report.section("a", lambda note: {"difference": 0.2, "checks": {"close": False, "finite": True}})
        assert entry["status"] == "check_failed" and entry["failed_checks"] == ["close"] and entry["difference"] == 0.2

    def test_sections_past_the_budget_are_skipped(self, tmp_path: Path) -> None:
        path, clock = tmp_path / "out.json", _Clock()
        report = gpu.Report(path, budget_s=10, clock=clock)
        ran: list[str] = []

        def slow(note: gpu.Note) -> dict[str, Any]:
            ran.append("slow")
            clock.now += 11  # a section that starts in time may end past the budget
            return {}

        report.section("slow", slow)
        report.section("late", lambda note: ran.append("late") or {})
        report.finish()
        sections = _read(path)["sections"]
        assert ran == ["slow"] and sections["slow"]["status"] == "ok"
        assert sections["late"] == {"status": "skipped", "reason": "budget of 10 s spent at 11 s"}

    def test_rounds_stop_when_the_next_would_not_fit(self) -> None:
        clock = _Clock()
        report = gpu.Report(None, budget_s=9, clock=clock)
        plan = dataclasses.replace(gpu.PLANS["short"], rounds=5)

        def contender() -> float:
            clock.now += 2
            return 1.0

        rounds = gpu._alternate(report, plan, {"a": contender}, lambda key, value: None, timer=clock)
        assert rounds.samples == {"a": [1.0] * 4}  # after 4 rounds (8 s), 1 s is left: less than a round


@pytest.mark.slow
def test_the_sections_run_at_tiny_sizes_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    main(["gpu", "--short", "--device", "cpu", "--json", str(out), "--budget", "600"])
    results = _read(out)
    assert results["complete"]
    sections = results["sections"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(gpu.SECTIONS, "ok")
    runs = sections["cuda_path"]["runs"]
    assert runs["off resumed"]["steps"] == [3, 4] and all(math.isfinite(v) for v in runs["auto"]["losses"])
    assert sections["small"]["params"] == 3_990_017  # the 4.0M-parameter U-Net
    assert set(sections["ddpm-cifar10"]["images_per_s"]) == {"ddpm-jobs auto", "diffusers fp32"}
    assert sections["ddp"]["overhead"] < 1 and len(sections["ddp"]["rank_runs"]["1 DDP rank (off)"]) == 1
