"""The `ddpm` command through typer's CliRunner: against the real API process for submit, list,
status, cancel, metrics, the --json listings, download and export into folders, evaluations and
download --best (evaluation rows written into the database), and sample --wait --out with a real
worker; against mock transports for tables (piped, narrow terminals), sample (a server without
the route, waiting), evaluations and watch (exit codes by final status); and help text on every
parameter."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
import typer
from PIL import Image
from rich.console import Console
from rich.text import Text
from sqlalchemy import delete
from typer.testing import CliRunner

from app.client import DdpmClient
from app.client import cli as cli_module
from app.client.cli import app
from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.models import Evaluation
from app.routing import sample_queue
from tests.app.test_spec_file import SCIENTIFIC_JSON, SCIENTIFIC_YAML
from tests.client.conftest import RunningApi, TrainedJob
from tests.client.sse_server import sse
from tests.conftest import evaluation_row
from tests.e2e.conftest import process, worker_argv

runner = CliRunner()


def ddpm(api: RunningApi | None, key: str | None, *args: str, stdin: str | None = None):
    options = [*(["--server", api.base] if api else []), *(["--key", key] if key else [])]
    return runner.invoke(app, [*options, *args], input=stdin)


def assert_clean_error(result, *fragments: str) -> None:
    """Exit 1, the message in stderr, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in " ".join(result.stderr.split()), result.stderr


class TestSpecFiles:
    """How the file is read is app.spec_file's (tests/app/test_spec_file.py); here, that submit uses it."""

    @pytest.fixture
    def sent(self, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
        bodies: list[dict] = []

        def handler(request: httpx.Request) -> httpx.Response:
            bodies.append(json.loads(request.content))
            return httpx.Response(201, json={"id": "j1", "status": "queued", "total_steps": 10})

        use_transport(monkeypatch, handler)
        return bodies

    def test_yaml_scientific_notation_is_sent_as_its_json_equivalent(self, sent: list[dict], tmp_path: Path) -> None:
        (tmp_path / "spec.yaml").write_text(SCIENTIFIC_YAML)
        (tmp_path / "spec.json").write_text(json.dumps(SCIENTIFIC_JSON))
        for name in ("spec.yaml", "spec.json"):
            result = ddpm(None, "k", "submit", str(tmp_path / name))
            assert result.exit_code == 0, result.output
        assert sent == [SCIENTIFIC_JSON, SCIENTIFIC_JSON]

    def test_yaml_from_stdin(self, sent: list[dict]) -> None:
        result = ddpm(None, "k", "submit", "-", "--name", "piped", stdin=SCIENTIFIC_YAML)
        assert result.exit_code == 0, result.output
        assert sent == [SCIENTIFIC_JSON | {"name": "piped"}]

    def test_not_a_mapping(self) -> None:
        result = ddpm(None, "k", "submit", "-", stdin="- a\n- b\n")
        assert_clean_error(result, "stdin must hold a mapping (the job spec), not list")

    def test_missing_file(self, tmp_path: Path) -> None:
        assert_clean_error(ddpm(None, "k", "submit", str(tmp_path / "nope.yaml")), "cannot read", "nope.yaml")


@pytest.mark.e2e
class TestAgainstTheApi:
    @pytest.fixture
    def key(self, new_key: Callable[[], str]) -> str:
        return new_key()

    def test_submit_yaml_then_list_status_cancel(self, api: RunningApi, key: str, tmp_path: Path) -> None:
        spec = tmp_path / "spec.yaml"
        spec.write_text("name: from yaml\ntraining:\n  steps: 5\n  learning_rate: 2e-4\n")
        submitted = ddpm(api, key, "submit", str(spec))
        assert submitted.exit_code == 0, submitted.output
        job_id = submitted.stdout.strip()
        assert uuid.UUID(job_id) and "ddpm watch " + job_id in submitted.stderr
        with DdpmClient(api.base, key) as client:
            job = client.get(job_id)
        assert job["spec"]["training"]["learning_rate"] == 2e-4 and job["name"] == "from yaml"

        listed = ddpm(api, key, "list")
        assert listed.exit_code == 0, listed.output
        assert job_id in listed.stdout and "queued" in listed.stdout and "0/5" in listed.stdout

        shown = ddpm(api, key, "status", job_id)
        assert shown.exit_code == 0, shown.output
        assert all(s in shown.stdout for s in (job_id, "from yaml", "queued", "0/5 steps", "tiny on digits"))

        cancelled = ddpm(api, key, "cancel", job_id)
        assert cancelled.exit_code == 0 and f"job {job_id} cancelled" in cancelled.stdout
        assert job_id in ddpm(api, key, "list", "--status", "cancelled").stdout
        assert "no jobs with status queued" in ddpm(api, key, "list", "--status", "queued").stderr

    def test_submit_json_from_stdin_with_a_name(self, api: RunningApi, key: str) -> None:
        result = ddpm(api, key, "submit", "-", "--name", "piped", stdin='{"training": {"steps": 3}}')
        assert result.exit_code == 0, result.output
        with DdpmClient(api.base, key) as client:
            job = client.get(result.stdout.strip())
            client.cancel(job["id"])
        assert (job["name"], job["total_steps"]) == ("piped", 3)

    def test_errors_print_the_detail_and_exit_1(self, api: RunningApi, key: str) -> None:
        missing = str(uuid.uuid4())
        assert_clean_error(ddpm(api, key, "status", missing), "error (404)", missing)
        assert_clean_error(ddpm(api, key, "submit", "-", stdin="training: {steps: 0}"), "training.steps")
        assert_clean_error(ddpm(api, "ddpm_wrong", "list"), "error (401)")
        assert_clean_error(ddpm(api, key, "metrics", "not-a-uuid"), "error (422)", "job_id")
        assert_clean_error(ddpm(None, key, "--server", "http://127.0.0.1:9", "list"), "cannot reach")

    def test_status_of_a_finished_job_and_cancel_refused(self, api: RunningApi, trained: TrainedJob) -> None:
        job_id = trained.job["id"]
        shown = ddpm(api, trained.key, "status", job_id)
        assert "succeeded" in shown.stdout and "30/30 steps (100%)" in shown.stdout
        assert_clean_error(ddpm(api, trained.key, "cancel", job_id), "error (409)", "already succeeded")

    def test_metrics_csv(self, api: RunningApi, trained: TrainedJob) -> None:
        result = ddpm(api, trained.key, "metrics", trained.job["id"], "--csv")
        assert result.exit_code == 0, result.output
        with DdpmClient(api.base, trained.key) as client:
            points = list(client.metrics(trained.job["id"]))
        rows = list(csv.reader(io.StringIO(result.stdout)))
        assert rows[0] == ["step", "loss", "lr", "images_per_s", "mfu", "peak_memory_bytes", "created_at"]
        assert rows[1:] == [["" if p[f] is None else str(p[f]) for f in rows[0]] for p in points]
        assert [r[0] for r in rows[1:]] == ["10", "20", "30"]

    def test_metrics_table(self, api: RunningApi, trained: TrainedJob) -> None:
        result = ddpm(api, trained.key, "metrics", trained.job["id"])
        assert result.exit_code == 0, result.output
        assert result.stdout.split()[:5] == ["step", "loss", "lr", "images/s", "at"]
        assert f"{trained.job['loss']:.4f}" in result.stdout

    def test_download_and_export_into_folders_or_files(
        self, api: RunningApi, trained: TrainedJob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        job_id = trained.job["id"]
        with DdpmClient(api.base, trained.key) as client:
            listed = {c["step"]: c["sha256"] for c in client.checkpoints(job_id)}
        name = f"{job_id}-step-00000020.safetensors"
        (tmp_path / "existing").mkdir()
        outs = {
            "new/runs/": Path("new/runs", name),  # a trailing slash: created
            "runs": Path("runs", name),  # no extension: a folder, created
            "existing": Path("existing", name),
            "ten.safetensors": Path("ten.safetensors"),  # a file name
        }
        for out, expected in outs.items():
            result = ddpm(api, trained.key, "download", job_id, "--step", "20", "--out", out)
            assert result.exit_code == 0, result.output
            assert Path(result.stdout.strip()) == expected and "sha256 verified" in result.stderr
            assert hashlib.sha256(expected.read_bytes()).hexdigest() == listed[20]
        assert_clean_error(ddpm(api, trained.key, "download", job_id, "--step", "7"), "error (404)")

        exported = ddpm(api, trained.key, "export", job_id, "--out", "exports")
        assert exported.exit_code == 0, exported.output
        path = Path(exported.stdout.strip())
        assert path == Path("exports", f"{job_id}-step-00000030-diffusers.zip")
        with zipfile.ZipFile(path) as archive:
            assert "model_index.json" in archive.namelist()

        grids = ddpm(api, trained.key, "samples", job_id, "--out", "grids")
        assert grids.exit_code == 0, grids.output
        assert grids.stdout.splitlines() == [str(Path("grids", f"{job_id}-samples-00000030.png"))]
        assert Path("grids", f"{job_id}-samples-00000030.png").read_bytes().startswith(b"\x89PNG")
        files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
        assert files == {str(p) for p in outs.values()} | {str(path), grids.stdout.strip()}  # nothing else

    def test_listings_as_json_and_piped(self, api: RunningApi, trained: TrainedJob) -> None:
        job_id = trained.job["id"]
        with DdpmClient(api.base, trained.key) as client:
            expected = {
                ("list",): list(client.list_jobs()),
                ("status", job_id): client.get(job_id),
                ("metrics", job_id): list(client.metrics(job_id)),
                ("checkpoints", job_id): client.checkpoints(job_id),
                ("samples", job_id): client.samples(job_id),
            }
        for args, value in expected.items():
            result = ddpm(api, trained.key, *args, "--json")
            assert result.exit_code == 0, result.output
            assert json.loads(result.stdout) == value, args
        piped = ddpm(api, trained.key, "checkpoints", job_id).stdout.splitlines()
        assert [line.split()[:3] for line in piped] == [["step", "bytes", "sha256"]] + [
            [str(c["step"]), f"{c['size_bytes']:,}", c["sha256"]] for c in expected[("checkpoints", job_id)]
        ]

    def test_evaluations_and_the_best_checkpoint(
        self, api: RunningApi, trained: TrainedJob, service_settings: Settings, tmp_path: Path
    ) -> None:
        job_id = trained.job["id"]
        none = ddpm(api, trained.key, "evaluations", job_id)
        assert none.exit_code == 0 and none.stdout == ""
        assert "its spec's evaluation.every is 0" in " ".join(none.stderr.split())
        no_best = ddpm(api, trained.key, "download", job_id, "--best")
        assert_clean_error(no_best, "error (404)", "no evaluated checkpoint")

        with DdpmClient(api.base, trained.key) as client:
            listed = {c["step"]: c["sha256"] for c in client.checkpoints(job_id)}
        with evaluations_in_the_database(service_settings, job_id, {10: 30.0, 20: 12.5, 30: 12.5}):
            shown = ddpm(api, trained.key, "evaluations", job_id)
            as_json = ddpm(api, trained.key, "evaluations", job_id, "--json")
            best = ddpm(api, trained.key, "download", job_id, "--best", "--out", str(tmp_path))
        assert shown.exit_code == 0, shown.output
        assert [line.split()[:3] for line in shown.stdout.splitlines()] == [
            ["step", "fid", "kid"],
            ["10", "30.00", "0.0200"],
            ["20", "12.50", "0.0200"],
            ["30", "12.50", "0.0200"],
        ]
        evaluations = json.loads(as_json.stdout)
        assert [(e["step"], e["fid"]) for e in evaluations] == [(10, 30.0), (20, 12.5), (30, 12.5)]
        assert evaluations[0].keys() == {
            "step", "fid", "kid", "kid_std", "samples", "reference_images", "feature_network", "seconds", "created_at"
        }  # fmt: skip
        assert best.exit_code == 0, best.output
        path = Path(best.stdout.strip())
        assert path == tmp_path / f"{job_id}-step-00000020.safetensors"  # the lowest FID; on a tie, the earliest
        assert hashlib.sha256(path.read_bytes()).hexdigest() == listed[20]

    @pytest.mark.slow
    def test_sample_wait_out_downloads_the_grid_and_the_npz(
        self, api: RunningApi, trained: TrainedJob, tmp_path: Path
    ) -> None:
        job_id, log = trained.job["id"], api.logs / "sample-worker.log"
        args = ["--count", "4", "--steps", "5", "--out", str(tmp_path / "drawn"), "--timeout", "240"]
        # A worker on the sample requests' queue only, so the jobs other tests queue stay queued.
        with process([*worker_argv(), "-Q", sample_queue(api.env["DDPM_QUEUE"])], api.env, log):
            result = ddpm(api, trained.key, "sample", job_id, *args)
        assert result.exit_code == 0, result.output + log.read_text()[-3000:]
        png, npz = (Path(line) for line in result.stdout.splitlines())
        assert png.parent == npz.parent == tmp_path / "drawn"
        assert png.name.startswith("sample-") and png.with_suffix(".npz") == npz  # sample-<request id>
        with Image.open(png) as grid:
            assert grid.size == (19, 19)  # 2x2 grid of 8x8 digits, 1 px padding
        images = np.load(npz)["images"]
        assert (images.shape, images.dtype) == ((4, 8, 8, 1), np.uint8)


@contextmanager
def evaluations_in_the_database(settings: Settings, job_id: str, fids: dict[int, float]) -> Iterator[None]:
    """Evaluation rows as the worker writes them, removed afterwards (the trained job is shared)."""
    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    job = uuid.UUID(job_id)
    try:
        with session_scope(factory) as session:
            for step, fid in fids.items():
                session.add(evaluation_row(job, step, fid, kid=0.02, kid_std=0.001, samples=100, seconds=1.5))
        yield
    finally:
        with session_scope(factory) as session:
            session.execute(delete(Evaluation).where(Evaluation.job_id == job))
        engine.dispose()


def use_transport(monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], httpx.Response]) -> None:
    """Make the CLI's client talk to `handler` instead of the network."""
    patched = partial(DdpmClient, transport=httpx.MockTransport(handler), reconnect_delay=0.01)
    monkeypatch.setattr(cli_module, "DdpmClient", patched)


class TestSample:
    def test_a_server_without_the_route_says_so(self, monkeypatch: pytest.MonkeyPatch) -> None:
        use_transport(monkeypatch, lambda r: httpx.Response(404, json={"detail": "Not Found"}))
        result = ddpm(None, "k", "sample", "j1", "--count", "4")
        assert_clean_error(result, "does not offer on-demand sampling")

    def test_405_too(self, monkeypatch: pytest.MonkeyPatch) -> None:
        use_transport(monkeypatch, lambda r: httpx.Response(405, json={"detail": "Method Not Allowed"}))
        assert_clean_error(ddpm(None, "k", "sample", "j1"), "does not offer on-demand sampling")

    def test_an_unknown_job_is_the_servers_404(self, monkeypatch: pytest.MonkeyPatch) -> None:
        use_transport(monkeypatch, lambda r: httpx.Response(404, json={"detail": "job j1 not found"}))
        assert_clean_error(ddpm(None, "k", "sample", "j1"), "error (404)", "job j1 not found")

    def test_sends_the_options(self, monkeypatch: pytest.MonkeyPatch) -> None:
        seen: list[dict] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(json.loads(request.content))
            return httpx.Response(202, json={"id": "s1", "status": "queued"})

        use_transport(monkeypatch, handler)
        args = ["--count", "4", "--seed", "7", "--sampler", "ddim", "--steps", "50", "--checkpoint-step", "20"]
        result = ddpm(None, "k", "sample", "j1", *args)
        assert result.exit_code == 0, result.output
        assert seen == [{"count": 4, "seed": 7, "sampler": "ddim", "steps": 50, "checkpoint_step": 20}]
        assert json.loads(result.stdout) == {"id": "s1", "status": "queued"}
        assert ddpm(None, "k", "sample", "j1", "--checkpoint-step", "best").exit_code == 0
        assert seen[1] == {"checkpoint_step": "best"}


class TestSampleWait:
    """`ddpm sample --wait [--out DIR]` against a scripted server: polls until the request ends."""

    PNG, NPZ = b"\x89PNG fake grid", b"PK fake npz"

    def serve(self, monkeypatch: pytest.MonkeyPatch, statuses: list[str], error: str | None = None) -> list[str]:
        seen: list[str] = []
        base = "/v1/jobs/j1/sample/s1"

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(f"{request.method} {request.url.path}")
            if request.method == "POST":
                return httpx.Response(202, json={"id": "s1", "status": "queued"})
            for suffix, body in ((".png", self.PNG), (".npz", self.NPZ)):
                if request.url.path == base + suffix:
                    sha = hashlib.sha256(body).hexdigest()
                    disposition = f'attachment; filename="sample-s1{suffix}"'
                    return httpx.Response(
                        200, content=body, headers={"ETag": f'"{sha}"', "Content-Disposition": disposition}
                    )
            state = statuses.pop(0) if len(statuses) > 1 else statuses[0]
            done = state == "succeeded"
            body = {"id": "s1", "status": state, "error": error if state == "failed" else None}
            return httpx.Response(
                200,
                json=body | {"png_url": base + ".png" if done else None, "npz_url": base + ".npz" if done else None},
            )

        use_transport(monkeypatch, handler)
        return seen

    def test_waits_then_downloads_both_files(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        seen = self.serve(monkeypatch, ["queued", "running", "succeeded"])
        result = ddpm(None, "k", "sample", "j1", "--out", str(tmp_path / "drawn"))
        assert result.exit_code == 0, result.output
        png, npz = (tmp_path / "drawn" / "sample-s1.png", tmp_path / "drawn" / "sample-s1.npz")
        assert result.stdout.splitlines() == [str(png), str(npz)]
        assert (png.read_bytes(), npz.read_bytes()) == (self.PNG, self.NPZ)
        polls = [s for s in seen if s == "GET /v1/jobs/j1/sample/s1"]
        assert seen[0] == "POST /v1/jobs/j1/sample" and len(polls) == 3

    def test_a_failed_request_is_a_clean_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.serve(monkeypatch, ["running", "failed"], error="the checkpoint at step 20 is gone")
        result = ddpm(None, "k", "sample", "j1", "--wait")
        assert_clean_error(result, "sample request s1 failed: the checkpoint at step 20 is gone")

    def test_gives_up_after_the_timeout(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.serve(monkeypatch, ["queued"])
        result = ddpm(None, "k", "sample", "j1", "--out", str(tmp_path), "--timeout", "0")
        assert_clean_error(result, "sample request s1 is still queued after 0 s")
        assert list(tmp_path.iterdir()) == []


class TestLogs:
    def test_prints_every_page_of_lines_and_sends_the_attempt(self, monkeypatch: pytest.MonkeyPatch) -> None:
        seen: list[dict] = []
        line = {"at": "2026-01-01T00:00:00Z", "level": "INFO", "logger": "worker.attempt"}
        pages = {
            None: {"items": [line | {"attempt": 2, "seq": 0, "message": "resumed [step 20]"}], "next_cursor": "2.0"},
            "2.0": {"items": [line | {"attempt": 2, "seq": 1, "message": "ended\n  two lines"}], "next_cursor": None},
        }

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(dict(request.url.params))
            return httpx.Response(200, json=pages[request.url.params.get("cursor")])

        use_transport(monkeypatch, handler)
        result = ddpm(None, "k", "logs", "j1", "--attempt", "2")
        assert result.exit_code == 0, result.output
        assert seen == [{"limit": "1000", "attempt": "2"}, {"limit": "1000", "attempt": "2", "cursor": "2.0"}]
        out = result.stdout.splitlines()
        assert [o.split(" #", 1)[-1] for o in out] == [
            "2 INFO    worker.attempt: resumed [step 20]",  # as logged: no markup read into it
            "2 INFO    worker.attempt: ended",
            "  two lines",
        ]

    def test_none_yet_says_so_and_a_bad_attempt_is_the_servers_422(self, monkeypatch: pytest.MonkeyPatch) -> None:
        use_transport(monkeypatch, lambda r: httpx.Response(200, json={"items": [], "next_cursor": None}))
        result = ddpm(None, "k", "logs", "j1")
        assert result.exit_code == 0 and result.stdout == "" and "no log lines yet" in result.stderr
        detail = [{"loc": ["query", "attempt"], "msg": "job j1 has had 1 attempt; attempt 3 has no lines"}]
        use_transport(monkeypatch, lambda r: httpx.Response(422, json={"detail": detail}))
        assert_clean_error(ddpm(None, "k", "logs", "j1", "--attempt", "3"), "attempt 3 has no lines")


def event_stream(*chunks: str) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        body = "".join(chunks).encode()
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    return handler


def job_event(status: str, step: int, error: str | None = None) -> str:
    job = {
        "id": "j1",
        "status": status,
        "step": step,
        "total_steps": 20,
        "attempt": 1,
        "loss": None,
        "error": error,
        "spec": {"training": {"batch_size": 50}},
    }
    return sse("status", job)


class TestWatch:
    def test_exit_0_when_the_job_succeeds(self, monkeypatch: pytest.MonkeyPatch) -> None:
        metric = sse("metric", {"step": 10, "loss": 0.25, "lr": 1e-3, "images_per_s": 100.0}, "10.0")
        checkpoint = sse("checkpoint", {"step": 20, "sha256": "ab" * 32, "size_bytes": 1234}, "20.1")
        events = [job_event("running", 0), metric, checkpoint, job_event("succeeded", 20)]
        use_transport(monkeypatch, event_stream(*events))
        result = ddpm(None, "k", "watch", "j1")
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert "step 10/20  loss 0.2500  100 img/s  ETA 00:00:05" in out  # 10 steps x 50 images / 100 per s
        assert "checkpoint at step 20 (1,234 bytes, sha256 abababababab…)" in out
        assert "job j1 succeeded at step 20/20" in out

    def test_mfu_peak_memory_and_training_events_are_shown(self, monkeypatch: pytest.MonkeyPatch) -> None:
        halved = {"id": 7, "attempt": 1, "step": 12, "kind": "oom_halved", "message": "micro-batch 64 -> 32",
                  "detail": {"micro_batch": 32, "was": 64, "batch": 128}}  # fmt: skip
        events = [job_event("running", 0), sse("metric", GPU_POINT, "10.0"), sse("training_event", halved, "12.4.7")]
        use_transport(monkeypatch, event_stream(*events, job_event("succeeded", 20)))
        result = ddpm(None, "k", "watch", "j1")
        assert result.exit_code == 0, result.output
        assert "step 10/20  loss 0.5000  4,500 img/s  MFU 41.2%  3.0 GiB  ETA 00:00:00" in result.stdout
        assert "oom_halved at step 12: micro-batch 64 -> 32" in result.stdout

    def test_exit_1_when_it_fails(self, monkeypatch: pytest.MonkeyPatch) -> None:
        use_transport(monkeypatch, event_stream(job_event("running", 0), job_event("failed", 3, error="loss is NaN")))
        result = ddpm(None, "k", "watch", "j1")
        assert result.exit_code == 1
        assert "job j1 failed at step 3/20" in result.stdout and "loss is NaN" in result.stdout

    def test_exit_1_for_an_unknown_job(self, monkeypatch: pytest.MonkeyPatch) -> None:
        use_transport(monkeypatch, lambda r: httpx.Response(404, json={"detail": "job j1 not found"}))
        assert_clean_error(ddpm(None, "k", "watch", "j1"), "job j1 not found")


EVALUATIONS = [
    {
        "step": step,
        "fid": fid,
        "kid": kid,
        "kid_std": 0.0004,
        "samples": 1000,
        "reference_images": 1797,
        "feature_network": "digits-classifier",
        "seconds": 3.5,
        "created_at": "2026-11-30T06:28:57+00:00",
    }
    for step, fid, kid in ((10, 41.5, 0.0321), (20, 12.345, 0.0123))
]


class TestEvaluations:
    """`ddpm evaluations` against a mock server: the table, --json, and what it says when there are none."""

    def serve(self, monkeypatch: pytest.MonkeyPatch, evaluations: list[dict], every: int = 10) -> list[str]:
        seen: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(f"{request.url.path}?{request.url.query.decode()}")
            if request.url.path == "/v1/jobs/j1/evaluations":
                return httpx.Response(200, json=evaluations)
            return httpx.Response(200, json={"id": "j1", "spec": {"evaluation": {"every": every}}})

        use_transport(monkeypatch, handler)
        return seen

    def test_piped_table(self, monkeypatch: pytest.MonkeyPatch) -> None:
        seen = self.serve(monkeypatch, EVALUATIONS)
        result = ddpm(None, "k", "evaluations", "j1")
        assert result.exit_code == 0, result.output
        assert seen == ["/v1/jobs/j1/evaluations?after_step=-1&limit=1000"]
        when = cli_module._when(EVALUATIONS[0]["created_at"])
        rows = [[c.strip() for c in line.split("  ") if c.strip()] for line in result.stdout.splitlines()]
        assert rows == [
            ["step", "fid", "kid", "samples", "reference", "network", "seconds", "at"],
            ["10", "41.50", "0.0321 ± 0.0004", "1,000", "1,797", "digits-classifier", "3.5", when],
            ["20", "12.35", "0.0123 ± 0.0004", "1,000", "1,797", "digits-classifier", "3.5", when],
        ]

    def test_json(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.serve(monkeypatch, EVALUATIONS)
        result = ddpm(None, "k", "evaluations", "j1", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == EVALUATIONS

    def test_none_says_how_to_turn_it_on_or_when_the_first_comes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.serve(monkeypatch, [], every=0)
        off = ddpm(None, "k", "evaluations", "j1")
        assert off.exit_code == 0 and off.stdout == ""
        assert "job j1 has no evaluations yet; its spec's evaluation.every is 0" in " ".join(off.stderr.split())
        self.serve(monkeypatch, [], every=5000)
        on = ddpm(None, "k", "evaluations", "j1")
        assert "job j1 has no evaluations yet; the first comes at step 5,000" in " ".join(on.stderr.split())

    def test_step_and_best_exclude_each_other(self) -> None:
        for command in ("download", "export"):
            result = ddpm(None, "k", command, "j1", "--step", "10", "--best")
            assert_clean_error(result, "choose one of --step and --best")


TRAINING_EVENTS = [
    {"id": 3, "attempt": 1, "step": 12, "kind": "oom_halved", "message": "out of memory: micro-batch 64 -> 32",
     "detail": {"micro_batch": 32, "was": 64, "batch": 128}, "created_at": "2026-11-30T06:28:57+00:00"},
    {"id": 9, "attempt": 2, "step": 1, "kind": "graphs_failed", "message": "capture failed: trains without graphs",
     "detail": {"error": "RuntimeError: boom"}, "created_at": "2026-11-30T06:30:00+00:00"},
]  # fmt: skip
GPU_POINT = {"step": 10, "loss": 0.5, "lr": 1e-3, "images_per_s": 4500.0, "mfu": 0.4123, "peak_memory_bytes": 3 * 2**30}


class TestTrainingEvents:
    """`ddpm events` against a mock server (two pages), and `ddpm metrics` with a GPU job's columns."""

    def serve(self, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        seen: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request.url.query.decode())
            if request.url.path == "/v1/jobs/j1/metrics":
                point = GPU_POINT | {"loss_by_t": None, "created_at": TRAINING_EVENTS[0]["created_at"]}
                return httpx.Response(200, json={"items": [point], "next_after_step": None})
            first = "after_id" not in request.url.params
            page = TRAINING_EVENTS[:1] if first else TRAINING_EVENTS[1:]
            return httpx.Response(200, json={"items": page, "next_after_id": 3 if first else None})

        use_transport(monkeypatch, handler)
        return seen

    def test_piped_table_over_every_page_and_json(self, monkeypatch: pytest.MonkeyPatch) -> None:
        seen = self.serve(monkeypatch)
        result = ddpm(None, "k", "events", "j1")
        assert result.exit_code == 0, result.output
        assert seen == ["limit=100", "limit=100&after_id=3"]
        rows = [[c.strip() for c in line.split("  ") if c.strip()] for line in result.stdout.splitlines()]
        assert rows == [
            ["step", "attempt", "kind", "message", "at"],
            [
                "12",
                "1",
                "oom_halved",
                "out of memory: micro-batch 64 -> 32",
                cli_module._when(TRAINING_EVENTS[0]["created_at"]),
            ],
            [
                "1",
                "2",
                "graphs_failed",
                "capture failed: trains without graphs",
                cli_module._when(TRAINING_EVENTS[1]["created_at"]),
            ],
        ]
        as_json = ddpm(None, "k", "events", "j1", "--json")
        assert json.loads(as_json.stdout) == TRAINING_EVENTS

    def test_metrics_table_shows_mfu_and_peak_memory(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.serve(monkeypatch)
        result = ddpm(None, "k", "metrics", "j1")
        assert result.exit_code == 0, result.output
        assert result.stdout.split()[:7] == ["step", "loss", "lr", "images/s", "MFU", "peak", "GiB"]
        assert result.stdout.splitlines()[1].split()[:6] == ["10", "0.5000", "0.001", "4500.0", "41.2%", "3.0"]


class TestHelp:
    def test_every_command_and_parameter_has_help(self) -> None:
        group = typer.main.get_command(app)
        assert isinstance(group, typer.core.TyperGroup)
        missing = [f"ddpm {p.name}" for p in group.params if not getattr(p, "help", None)]
        for name, command in group.commands.items():
            assert command.help, f"ddpm {name} has no help"
            missing += [f"ddpm {name} {p.name}" for p in command.params if not getattr(p, "help", None)]
            shown = runner.invoke(app, [name, "--help"], terminal_width=200)
            assert shown.exit_code == 0, shown.output
            names = [p.opts[0] if isinstance(p, typer.core.TyperOption) else p.metavar for p in command.params]
            assert all(n in shown.stdout for n in names), (name, names, shown.stdout)
        assert missing == []
        listed = runner.invoke(app, ["--help"], terminal_width=200).stdout
        expected = {"submit", "list", "status", "cancel", "metrics", "checkpoints", "samples", "download", "export"}
        expected |= {"evaluations"}
        assert all(f" {name} " in listed for name in expected | {"sample", "watch"})


LISTED_JOBS = [
    {
        "id": "0b7f6a3e-1c2d-4e5f-8a9b-0c1d2e3f4a5b",
        "name": "a long name with several words in it",
        "status": "succeeded",
        "step": 2000,
        "total_steps": 2000,
        "loss": 0.03125,
        "created_at": "2026-11-30T06:28:57+00:00",
    },
    {
        "id": "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b",
        "name": None,
        "status": "queued",
        "step": 0,
        "total_steps": 30,
        "loss": None,
        "created_at": "2026-11-30T07:01:02+00:00",
    },
]


class TestTables:
    """`ddpm list` (and every table) piped, at a narrow terminal, and as JSON."""

    @pytest.fixture(autouse=True)
    def jobs(self, monkeypatch: pytest.MonkeyPatch) -> None:
        use_transport(monkeypatch, lambda r: httpx.Response(200, json={"items": LISTED_JOBS, "next_cursor": None}))

    def test_piped_output_is_plain_aligned_columns(self) -> None:
        result = ddpm(None, "k", "list")
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert len(lines) == 3 and "\x1b" not in result.stdout  # a header and one line per job, no colour
        starts = [lines[0].index(h) for h in ("id", "name", "status", "step", "loss", "created")]
        when = [cli_module._when(j["created_at"]) for j in LISTED_JOBS]
        for line, job, created in zip(lines[1:], LISTED_JOBS, when, strict=True):
            cells = [job["id"], job["name"] or "", job["status"], f"{job['step']}/{job['total_steps']}"]
            cells += [cli_module._loss(job["loss"]), created]
            assert [line[start:].split("  ")[0].strip() for start in starts] == cells, line

    def test_a_terminal_too_narrow_shortens_the_name_then_leaves_columns_out(self, monkeypatch) -> None:
        first, when = LISTED_JOBS[0], cli_module._when(LISTED_JOBS[0]["created_at"])
        shown = {
            200: ["id", "name", "status", "step", "loss", "created"],
            100: ["id", "name", "status", "step", "loss", "created"],  # the name cut short (…)
            80: ["id", "status", "step", "created"],
            60: ["id", "status"],
        }
        for width, headers in shown.items():
            monkeypatch.setattr(cli_module, "out", Console(force_terminal=True, width=width))
            result = ddpm(None, "k", "list")
            assert result.exit_code == 0, result.output
            lines = Text.from_ansi(result.stdout).plain.splitlines()
            assert len(lines) == 3 and all(len(line) <= width for line in lines), lines
            assert lines[0].split() == headers
            assert lines[1].startswith(f"{first['id']}  ") and f"  {first['status']}" in lines[1]
            assert (when in lines[1]) == ("created" in headers)
            assert (first["name"] in lines[1]) == (width == 200)
            assert ("  a long nam…  " in lines[1]) == (width == 100)

    def test_json(self) -> None:
        result = ddpm(None, "k", "list", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == LISTED_JOBS
