"""Every benchmark in short mode: they run and print sane figures. Speed is never asserted here
(CI machines are shared and small); the full runs and their figures are in BENCHMARKS.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import api, capacity, ddp, prepare_images, recipes, service, stream, train, upload
from bench.__main__ import main


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


@pytest.mark.slow
class TestShortMode:
    def test_train(self, capsys: pytest.CaptureFixture[str]) -> None:
        results = train.run(short=True, device="cpu")
        rates = results["tiny"]["images_per_s"]
        assert set(rates) == {"ddpm-jobs", "diffusers fp32"} and all(map(_positive, rates.values()))
        assert _positive(results["tiny"]["ratios"]["diffusers fp32"])
        assert "ratio ddpm-jobs / diffusers fp32: " in capsys.readouterr().out

    def test_service(self, capsys: pytest.CaptureFixture[str]) -> None:
        results = service.run(short=True, device="cpu")
        assert _positive(results["ratio"]) and _positive(results["window_ratio"])
        assert 0 < results["on_log_share"] < 1
        assert "ratio through the worker / bare loop: " in capsys.readouterr().out

    def test_api(self, capsys: pytest.CaptureFixture[str]) -> None:
        results = api.run(short=True)
        assert _positive(results["post_to_running_median_s"]) and _positive(results["get_requests_per_s"])
        assert results["post_to_running_p99_s"] >= results["post_to_running_median_s"]
        out = capsys.readouterr().out
        assert "POST /v1/jobs -> running" in out and "requests/s" in out and "SSE watchers" in out

    def test_capacity(self, capsys: pytest.CaptureFixture[str]) -> None:
        f = capacity.run(short=True)
        assert f["metric_points"] > 0 and f["checkpoints"] > 0
        # a transaction per metric point (and a pool pre-ping each), plus a few heartbeats, checkpoints, sweeps
        assert 1 <= f["transactions_per_metric_point"] <= 10
        assert 1 <= f["transactions_per_writing_transaction"] <= 10
        # a metric point's transaction: the job row updated, one row inserted, their index entries
        assert 100 < f["wal_bytes_per_metric_point"] < 20_000
        assert 100 < f["wal_bytes_per_checkpoint"] < 50_000
        assert 1.5 <= f["tuples_written_per_metric_point"] <= 5
        assert 40 < f["metric_point_row_bytes"] < f["metric_point_bytes_on_disk"] < 2_000
        # the API reads a watched job every events_poll_interval_s (0.5 s)
        assert 0.5 < f["api_transactions_per_s_per_watched_job_1_watcher"] < 20
        assert _positive(f["worker_idle_redis_commands_per_s"])
        assert all(map(_positive, f["pgbench_metric_point_tps"].values()))
        out = capsys.readouterr().out
        assert "WAL bytes / metric point" in out and "steps/s:" in out and out.count("JSON {") == 1

    def test_ddp(self, capsys: pytest.CaptureFixture[str]) -> None:
        results = ddp.run(short=True)
        assert results["max_relative_loss_difference"] < 1e-5  # the bound tests/e2e/test_multi_gpu.py holds
        assert all(map(_positive, results["images_per_s"].values()))
        assert "largest relative difference of the 2-rank loss curve" in capsys.readouterr().out

    def test_stream(self, capsys: pytest.CaptureFixture[str]) -> None:
        results = stream.run(short=True, device="cpu")
        assert set(results["cpu"]["images_per_s"]) == {"on-device", "host-streamed"}
        assert all(map(_positive, results["cpu"]["images_per_s"].values())) and _positive(results["cpu"]["ratio"])
        assert "ratio host-streamed / on-device: " in capsys.readouterr().out

    def test_upload(self, capsys: pytest.CaptureFixture[str]) -> None:
        results = upload.run(short=True)
        assert set(results["mib_per_s"]) == {"upload", "copy+fsync", "cp"}
        assert all(map(_positive, results["mib_per_s"].values())) and _positive(results["ratio"])
        assert "ratio upload / copy+fsync: " in capsys.readouterr().out

    def test_prepare_images(self, capsys: pytest.CaptureFixture[str]) -> None:
        results = prepare_images.run(short=True)
        rates = [v for k, v in results.items() if k.endswith("images/s")]
        assert len(rates) == 4 and all(map(_positive, rates))
        assert "images/s" in capsys.readouterr().out

    def test_recipes(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        out = tmp_path / "recipes.json"
        main(["recipes", "--short", "--device", "cpu", "--steps", "3", "--samples", "24", "--json", str(out)])
        results = json.loads(out.read_text())
        assert results["complete"] and results["steps"] == 3 and results["samples"] == 24
        assert [r["recipe"] for r in results["runs"]] == list(recipes.SHORT["only"])
        for r in results["runs"]:
            assert math.isfinite(r["fid"]) and r["fid"] >= 0 and math.isfinite(r["kid"]) and r["samples"] == 24
            assert r["feature_network"] == "digits-classifier" and r["reference_images"] == 1797
            assert _positive(r["images_per_s"]) and _positive(r["evaluation_seconds"]) and math.isfinite(r["loss"])
        fids = [row["fid"] for row in results["table"]]
        assert fids == sorted(fids) and [row["default"] for row in results["table"]].count(True) == 1
        printed = capsys.readouterr().out
        assert results["command"] in printed and "| rank | recipe" in printed
        assert "**x0/linear/none** (default)" in printed

    def test_command_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            main(["nonsense"])
        assert "invalid choice" in capsys.readouterr().err
