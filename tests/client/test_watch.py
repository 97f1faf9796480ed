"""`ddpm watch`: against a scripted event stream, the latest FID and KID beside the loss; end to
end, the installed command follows a real digits job trained by a real worker, while the API is
killed (-9) and restarted under it. It reconnects with Last-Event-ID, prints every metric point
once, and exits 0 when the job succeeds. What it printed is kept in test-artifacts/ddpm-watch.txt."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from app.auth.keys import generate_key
from app.client import cli as cli_module
from app.client.cli import app
from app.config import Settings
from tests.client.conftest import service_env
from tests.client.sse_server import Reply, scripted_server, sse
from tests.conftest import ARTIFACTS
from tests.e2e.conftest import BIN, api_argv, free_port, process, wait_ready, worker_argv

DIGITS_JOB = {
    "name": "watch digits",
    "dataset": {"kind": "digits", "image_size": 8},
    "training": {
        "steps": 40,
        "batch_size": 8,
        "learning_rate": 2e-3,
        "warmup_steps": 5,
        "log_every": 5,
        "checkpoint_every": 20,
    },
}
EVENTS_PATH = "/v1/jobs/{job_id}/events"


def status_event(status: str, step: int) -> str:
    job = {"id": "j1", "status": status, "step": step, "total_steps": 20, "attempt": 1, "loss": None, "error": None}
    return sse("status", job | {"spec": {"training": {"batch_size": 50}}})


def metric_event(step: int, loss: float) -> str:
    metric = {"step": step, "loss": loss, "lr": 1e-3, "images_per_s": 100.0, "loss_by_t": None}
    return sse("metric", metric, f"{step}.0")


def evaluation_event(step: int, fid: float, kid: float) -> str:
    evaluation = {
        "step": step,
        "fid": fid,
        "kid": kid,
        "kid_std": 0.0004,
        "samples": 1000,
        "reference_images": 1797,
        "feature_network": "digits-classifier",
        "seconds": 3.5,
    }
    return sse("evaluation", evaluation, f"{step}.3")  # after the step's metric, checkpoint and sample


class TestEvaluations:
    def test_the_latest_fid_and_kid_show_beside_the_loss(self, monkeypatch: pytest.MonkeyPatch) -> None:
        events = [
            status_event("running", 0),
            metric_event(5, 0.5),
            metric_event(10, 0.375),
            evaluation_event(10, 41.5, 0.0321),
            metric_event(15, 0.25),
            metric_event(20, 0.125),
            evaluation_event(20, 12.345, 0.0123),
            status_event("succeeded", 20),
        ]
        monkeypatch.setattr(cli_module, "out", Console(width=200))  # piped, and wide enough for whole lines
        with scripted_server([Reply(chunks=events)]) as server:
            result = CliRunner().invoke(app, ["--server", server.base, "--key", "k", "watch", "j1"])
        assert result.exit_code == 0, result.output
        printed = result.stdout.splitlines()
        assert [line for line in printed if line.startswith("step ")] == [
            "step 5/20  loss 0.5000  100 img/s  ETA 00:00:07",  # no evaluation yet: nothing beside the loss
            "step 10/20  loss 0.3750  100 img/s  ETA 00:00:05",
            "step 15/20  loss 0.2500  FID 41.50  KID 0.0321  100 img/s  ETA 00:00:02",
            "step 20/20  loss 0.1250  FID 41.50  KID 0.0321  100 img/s  ETA 00:00:00",
        ]
        assert [line.split(" ", 1)[1] for line in printed if " evaluation at " in line] == [
            f"evaluation at step {step}: FID {fid}, KID {kid} ± 0.0004 (1,000 samples against 1,797 images, "
            "digits-classifier, 3.5 s)"
            for step, fid, kid in ((10, "41.50", "0.0321"), (20, "12.35", "0.0123"))
        ]
        assert printed[-1] == "job j1 succeeded at step 20/20"


def wait_for_text(path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, path.read_text()):
            return
        if proc.poll() is not None:
            pytest.fail(f"ddpm watch exited with {proc.returncode} before {pattern!r}:\n{path.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"no {pattern!r} from ddpm watch in {timeout}s:\n{path.read_text()}")


@pytest.mark.e2e
@pytest.mark.slow
def test_watch_a_digits_job_across_an_api_crash(service_settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    key = generate_key().key
    # A queue of its own: the worker here must not pick up jobs other tests left queued.
    env = service_env(service_settings) | {
        "DDPM_PORT": str(port),
        "DDPM_BOOTSTRAP_API_KEY": key,
        "DDPM_QUEUE": f"ddpm-watch-{port}",
    }
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    watch_out = tmp_path / "watch.txt"
    logs = [tmp_path / "api1.log", tmp_path / "api2.log", tmp_path / "worker.log"]

    with process(api_argv(), env, logs[0]) as api, process(worker_argv(), env, logs[2]):
        wait_ready(base, api, logs[0])
        if EVENTS_PATH not in httpx.get(f"{base}/openapi.json").json()["paths"]:
            pytest.skip("this API has no event stream yet")
        job = httpx.post(f"{base}/v1/jobs", json=DIGITS_JOB, headers=headers, timeout=30).json()

        watch_env = {k: v for k, v in env.items() if not k.startswith("DDPM_")}
        watch_env |= {"DDPM_SERVER": base, "DDPM_API_KEY": key, "COLUMNS": "100"}
        with watch_out.open("wb") as out:
            watcher = subprocess.Popen(
                [str(BIN / "ddpm"), "watch", job["id"]], env=watch_env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            wait_for_text(watch_out, r"step 10/40 ", watcher, timeout=240)
            os.killpg(api.pid, signal.SIGKILL)  # the connection drops mid-stream
            api.wait()
            time.sleep(2)  # the job goes on training while no API answers
            with process(api_argv(), env, logs[1]) as api2:
                wait_ready(base, api2, logs[1])
                code = watcher.wait(timeout=300)
        finally:
            if watcher.poll() is None:
                watcher.kill()
    printed = watch_out.read_text()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "ddpm-watch.txt").write_text(printed)
    print(f"\n$ ddpm watch {job['id']}\n{printed}")

    assert code == 0, printed + "".join(p.read_text()[-2000:] for p in logs if p.exists())
    metric_steps = [int(m) for m in re.findall(r"^step (\d+)/40 ", printed, flags=re.M)]
    assert metric_steps == list(range(5, 41, 5))  # each point once, across the reconnect
    checkpoints = re.findall(r"checkpoint at step (\d+) \(", printed)
    assert checkpoints == ["20", "40"]
    assert f"job {job['id']} succeeded at step 40/40" in printed
    assert "connection lost" in printed and "reconnecting in" in printed
    assert "Traceback" not in printed
