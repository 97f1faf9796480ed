"""DdpmClient against a real API process (jobs, pages, errors, metrics, checkpoints and
sha256-checked downloads), the event stream's reconnects against a scripted server that drops
connections, and downloads refused when the bytes are wrong."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.client import ApiError, ChecksumMismatch, DdpmClient, Event, ServerUnreachable
from app.client.api import resolve_api_key, resolve_server
from tests.client.conftest import TINY_JOB, RunningApi, TrainedJob
from tests.client.sse_server import Reply, scripted_server, sse

QUICK = {"training": {"steps": 1}}  # queued and never trained here: no worker is running


@pytest.fixture
def client(api: RunningApi, new_key: Callable[[], str]) -> Iterator[DdpmClient]:
    with DdpmClient(api.base, new_key()) as c:
        yield c
        # Left queued, this test's jobs would be trained first by the worker of `trained`.
        for job in list(c.list_jobs(status="queued")):
            c.cancel(job["id"])


@pytest.mark.e2e
class TestJobs:
    def test_submit_get_cancel(self, client: DdpmClient) -> None:
        job = client.submit({"name": "one", **QUICK})
        assert (job["status"], job["name"], job["total_steps"], job["step"]) == ("queued", "one", 1, 0)
        assert client.get(job["id"]) == job
        cancelled = client.cancel(job["id"])
        assert (cancelled["id"], cancelled["status"], cancelled["cancel_requested"]) == (job["id"], "cancelled", True)

    def test_idempotency_key_returns_the_same_job(self, client: DdpmClient) -> None:
        key = uuid.uuid4().hex
        first = client.submit(QUICK, idempotency_key=key)
        assert client.submit(QUICK, idempotency_key=key)["id"] == first["id"]
        with pytest.raises(ApiError) as conflict:
            client.submit({"training": {"steps": 2}}, idempotency_key=key)
        assert conflict.value.status_code == 409
        assert "already used with a different request body" in conflict.value.detail

    def test_list_follows_cursors_newest_first(self, client: DdpmClient) -> None:
        ids = [client.submit({"name": f"j{i}", **QUICK})["id"] for i in range(5)]
        client.cancel(ids[0])
        assert [j["id"] for j in client.list_jobs(limit=2)] == ids[::-1]
        assert [j["id"] for j in client.list_jobs(status="cancelled", limit=1)] == [ids[0]]
        assert [j["id"] for j in client.list_jobs(status="queued", limit=3)] == ids[:0:-1]
        assert list(client.list_jobs(status="running")) == []

    def test_errors_carry_the_servers_status_and_detail(self, client: DdpmClient, api: RunningApi) -> None:
        missing = str(uuid.uuid4())
        with pytest.raises(ApiError) as not_found:
            client.get(missing)
        assert not_found.value.status_code == 404 and missing in not_found.value.detail

        with pytest.raises(ApiError) as invalid:
            client.submit({"training": {"steps": 0}})
        assert invalid.value.status_code == 422
        assert isinstance(invalid.value.detail, list)  # FastAPI's list, as sent
        assert "training.steps: Input should be greater than or equal to 1" in str(invalid.value)

        job = client.submit(QUICK)
        client.cancel(job["id"])
        assert client.cancel(job["id"])["status"] == "cancelled"  # repeating a cancel is harmless

        with DdpmClient(api.base, "ddpm_not-a-key") as stranger, pytest.raises(ApiError) as unauthorized:
            stranger.get(job["id"])
        assert unauthorized.value.status_code == 401

    def test_another_users_job_is_not_found(self, client: DdpmClient, api: RunningApi, new_key) -> None:
        job = client.submit(QUICK)
        with DdpmClient(api.base, new_key()) as other, pytest.raises(ApiError) as exc:
            other.get(job["id"])
        assert exc.value.status_code == 404

    def test_unreachable_server(self) -> None:
        with DdpmClient("http://127.0.0.1:9", "k") as c, pytest.raises(ServerUnreachable, match="cannot reach"):
            c.get(str(uuid.uuid4()))


@pytest.mark.e2e
@pytest.mark.slow
class TestTrainedJob:
    def test_metrics_follow_pages(self, api: RunningApi, trained: TrainedJob) -> None:
        with DdpmClient(api.base, trained.key) as c:
            points = list(c.metrics(trained.job["id"], page_size=1))
            assert [p["step"] for p in points] == [10, 20, 30]
            assert points == list(c.metrics(trained.job["id"]))
        assert set(points[0]) == {
            "step",
            "loss",
            "lr",
            "images_per_s",
            "loss_by_t",
            "mfu",
            "peak_memory_bytes",
            "created_at",
        }
        assert (points[0]["mfu"], points[0]["peak_memory_bytes"]) == (None, None)  # a CPU worker measures neither
        assert points[-1]["loss"] == pytest.approx(trained.job["loss"])

    def test_checkpoints(self, api: RunningApi, trained: TrainedJob) -> None:
        with DdpmClient(api.base, trained.key) as c:
            listed = c.checkpoints(trained.job["id"])
        assert [cp["step"] for cp in listed] == [10, 20, 30]
        assert all(len(cp["sha256"]) == 64 and cp["size_bytes"] > 0 for cp in listed)

    def test_download_newest_into_a_folder(self, api: RunningApi, trained: TrainedJob, tmp_path: Path) -> None:
        seen: list[tuple[int, int]] = []
        with DdpmClient(api.base, trained.key) as c:
            newest = c.checkpoints(trained.job["id"])[-1]
            path = c.download(trained.job["id"], tmp_path, progress=lambda done, total: seen.append((done, total)))
        assert path == tmp_path / f"{trained.job['id']}-step-00000030.safetensors"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == newest["sha256"]
        assert seen[-1] == (newest["size_bytes"], newest["size_bytes"])
        assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left

    def test_download_a_step_to_a_file_name(self, api: RunningApi, trained: TrainedJob, tmp_path: Path) -> None:
        target = tmp_path / "sub" / "ten.safetensors"
        with DdpmClient(api.base, trained.key) as c:
            first = c.checkpoints(trained.job["id"])[0]
            assert c.download(trained.job["id"], target, step=10) == target
            with pytest.raises(ApiError) as missing:
                c.download(trained.job["id"], tmp_path, step=11)
        assert hashlib.sha256(target.read_bytes()).hexdigest() == first["sha256"]
        assert missing.value.status_code == 404
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub", "ten.safetensors"]

    def test_the_spec_round_trips(self, trained: TrainedJob) -> None:
        assert trained.job["spec"]["training"]["steps"] == TINY_JOB["training"]["steps"]


class TestEvaluations:
    def test_follows_pages_by_step(self) -> None:
        seen: list[dict] = []
        rows = [{"step": step, "fid": 100.0 / step} for step in (10, 20, 30)]

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(dict(request.url.params))
            after, limit = int(request.url.params["after_step"]), int(request.url.params["limit"])
            return httpx.Response(200, json=[r for r in rows if r["step"] > after][:limit])

        with DdpmClient("http://test", "k", transport=httpx.MockTransport(handler)) as c:
            assert list(c.evaluations("j1", page_size=2)) == rows
        assert seen == [{"after_step": "-1", "limit": "2"}, {"after_step": "20", "limit": "2"}]


class TestDownloadRefusesWrongBytes:
    """A mock server whose checkpoint body does not hash to what it lists."""

    BODY = b"safetensors bytes" * 1000
    SHA = hashlib.sha256(BODY).hexdigest()

    def serve(self, body: bytes, header_sha: str, listed_sha: str) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/jobs/j1/checkpoints":
                created = "2026-01-01T00:00:00Z"
                return httpx.Response(
                    200, json=[{"step": 5, "size_bytes": len(body), "sha256": listed_sha, "created_at": created}]
                )
            if request.url.path == "/v1/jobs/j1/checkpoints/5":
                headers = {"ETag": f'"{header_sha}"', "X-Checksum-SHA256": header_sha}
                return httpx.Response(200, content=body, headers=headers)
            return httpx.Response(404, json={"detail": "Not Found"})

        return httpx.MockTransport(handler)

    def test_a_corrupted_body_is_deleted_and_refused(self, tmp_path: Path) -> None:
        corrupted = b"X" + self.BODY[1:]
        transport = self.serve(corrupted, self.SHA, self.SHA)
        with (
            DdpmClient("http://test", "k", transport=transport) as c,
            pytest.raises(ChecksumMismatch, match=f"expected {self.SHA}; nothing was saved"),
        ):
            c.download("j1", tmp_path)
        assert list(tmp_path.iterdir()) == []

    def test_a_header_that_disagrees_with_the_list_is_refused(self, tmp_path: Path) -> None:
        other = "0" * 64
        transport = self.serve(self.BODY, other, self.SHA)
        with DdpmClient("http://test", "k", transport=transport) as c, pytest.raises(ChecksumMismatch, match="lists"):
            c.download("j1", tmp_path / "out.safetensors")
        assert list(tmp_path.iterdir()) == []

    def test_the_right_bytes_are_saved(self, tmp_path: Path) -> None:
        with DdpmClient("http://test", "k", transport=self.serve(self.BODY, self.SHA, self.SHA)) as c:
            path = c.download("j1", tmp_path / "out.safetensors")
        assert path.read_bytes() == self.BODY


class TestDownloadTargets:
    """Where a download lands: into a folder under the server's (sanitised) name, or at a file name;
    never outside the folder given, whatever name a server sends."""

    BODY = b"weights" * 100
    SHA = hashlib.sha256(BODY).hexdigest()

    def serve(self, disposition: str | None) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/jobs/j1/checkpoints":
                listed = {
                    "step": 5,
                    "size_bytes": len(self.BODY),
                    "sha256": self.SHA,
                    "created_at": "2026-01-01T00:00:00Z",
                }
                return httpx.Response(200, json=[listed])
            headers = {"ETag": f'"{self.SHA}"'} | ({"Content-Disposition": disposition} if disposition else {})
            return httpx.Response(200, content=self.BODY, headers=headers)

        return httpx.MockTransport(handler)

    def download(self, dest, disposition: str | None = 'attachment; filename="j1-step-00000005.safetensors"') -> Path:
        with DdpmClient("http://test", "k", transport=self.serve(disposition)) as c:
            return c.download("j1", dest)

    def test_folders_and_file_names(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        name = "j1-step-00000005.safetensors"
        (tmp_path / "existing.d").mkdir()
        assert self.download(Path("runs")) == Path("runs", name)  # no extension, not there: a new folder
        assert self.download("slash.d/") == Path("slash.d", name)  # a trailing separator: a folder
        assert self.download(tmp_path / "existing.d") == tmp_path / "existing.d" / name
        assert self.download(".") == Path(name)
        assert self.download("deep/model.safetensors") == Path("deep/model.safetensors")  # a file name
        (tmp_path / "plain").write_bytes(b"old")
        assert self.download("plain") == Path("plain")  # an existing file is replaced
        found = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
        assert found == sorted(
            [f"runs/{name}", f"slash.d/{name}", f"existing.d/{name}", name, "deep/model.safetensors", "plain"]
        )
        assert all((tmp_path / f).read_bytes() == self.BODY for f in found)

    @pytest.mark.parametrize(
        ("disposition", "saved_as"),
        [
            ('attachment; filename="../../escaped.safetensors"', "escaped.safetensors"),
            ('attachment; filename="..\\..\\escaped.safetensors"', "escaped.safetensors"),
            ("attachment; filename*=UTF-8''%2Fetc%2Fescaped.safetensors", "escaped.safetensors"),
            ('attachment; filename=".."', "j1-step-00000005.safetensors"),
            ('attachment; filename=".bashrc"', "j1-step-00000005.safetensors"),
            ('attachment; filename="a\x01b"', "j1-step-00000005.safetensors"),
            (None, "j1-step-00000005.safetensors"),
        ],
    )
    def test_a_crafted_server_name_stays_in_the_folder(self, tmp_path: Path, disposition, saved_as: str) -> None:
        folder = tmp_path / "a" / "b"
        assert self.download(f"{folder}/", disposition) == folder / saved_as
        assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()] == [Path("a/b", saved_as)]


def job_json(status: str, step: int, attempt: int = 1) -> dict:
    return {"id": "j1", "status": status, "step": step, "total_steps": 30, "attempt": attempt}


def metric(step: int) -> str:
    return sse("metric", {"step": step, "loss": 1 / step, "lr": 1e-3, "images_per_s": 100.0}, f"{step}.0")


def status(state: str, step: int, attempt: int = 1) -> str:
    return sse("status", job_json(state, step, attempt))


def kinds(events: list[Event]) -> list[tuple[str, str | None]]:
    return [(e.event, e.id if e.id else e.data.get("status")) for e in events]


class TestEventStream:
    """Against a scripted server: drops, repeats, retries; each event is yielded once."""

    def stream(self, replies: list[Reply], last_event_id: str | None = None, on_reconnect=None, **options):
        with scripted_server(replies) as server:
            client = DdpmClient(server.base, "k", reconnect_delay=0.01, **options)
            with client:
                events = list(client.events("j1", last_event_id=last_event_id, on_reconnect=on_reconnect))
            return events, server.requests

    def test_reconnects_after_a_drop_with_last_event_id(self) -> None:
        first = [status("running", 0), metric(10), ": keep-alive\n\n", metric(20), "event: metric\nid: 30.0\ndata: {"]
        checkpoint = sse("checkpoint", {"step": 30, "sha256": "ab" * 32, "size_bytes": 9}, "30.1")
        second = [status("running", 20), metric(30), checkpoint, status("succeeded", 30)]
        drops: list[str] = []
        events, requests = self.stream(
            [Reply(first, end="drop"), Reply(second)], on_reconnect=lambda reason, delay: drops.append(reason)
        )

        assert kinds(events) == [
            ("status", "running"),
            ("metric", "10.0"),
            ("metric", "20.0"),
            ("metric", "30.0"),  # the half-sent one is not yielded; the reconnect sends it whole
            ("checkpoint", "30.1"),
            ("status", "succeeded"),
        ]
        assert events[1].data == {"step": 10, "loss": 0.1, "lr": 1e-3, "images_per_s": 100.0}
        assert events[-1].is_terminal and not events[0].is_terminal
        assert [r.get("last-event-id") for r in requests] == [None, "20.0"]
        assert len(drops) == 1 and "RemoteProtocolError" in drops[0]
        assert requests[0]["authorization"] == "Bearer k"
        assert requests[0]["accept"] == "text/event-stream"
        assert requests[0]["request-line"] == "GET /v1/jobs/j1/events HTTP/1.1"

    def test_a_clean_end_before_the_terminal_status_reconnects(self) -> None:
        replies = [Reply([status("running", 0), metric(10)]), Reply([status("failed", 10)])]
        events, requests = self.stream(replies)
        assert kinds(events) == [("status", "running"), ("metric", "10.0"), ("status", "failed")]
        assert [r.get("last-event-id") for r in requests] == [None, "10.0"]

    def test_events_a_server_repeats_are_yielded_once(self) -> None:
        replies = [
            Reply([status("running", 0), metric(10), metric(20)], end="drop"),
            Reply([status("running", 20), metric(10), metric(20), metric(30), status("succeeded", 30)]),
        ]
        events, _ = self.stream(replies)
        assert [e.id for e in events if e.event == "metric"] == ["10.0", "20.0", "30.0"]

    def test_a_new_attempt_is_a_new_status_event(self) -> None:
        replies = [
            Reply([status("running", 0), metric(10)], end="drop"),
            Reply([status("running", 10, attempt=2), metric(20), status("succeeded", 30, attempt=2)]),
        ]
        events, _ = self.stream(replies)
        statuses = [(e.data["status"], e.data["attempt"]) for e in events if e.event == "status"]
        assert statuses == [("running", 1), ("running", 2), ("succeeded", 2)]

    def test_a_finished_jobs_terminal_snapshot_comes_after_its_history(self) -> None:
        # The server opens with the status snapshot and ends with the terminal status again.
        finished = [status("succeeded", 20), metric(10), metric(20), status("succeeded", 20)]
        events, requests = self.stream([Reply(finished)])
        assert kinds(events) == [("metric", "10.0"), ("metric", "20.0"), ("status", "succeeded")]
        # A stream that ends after a terminal snapshot without repeating it: that status, no reconnect.
        events, requests = self.stream([Reply([status("cancelled", 0), metric(10)])])
        assert kinds(events) == [("metric", "10.0"), ("status", "cancelled")] and len(requests) == 1

    def test_resumes_from_a_given_last_event_id(self) -> None:
        events, requests = self.stream([Reply([status("succeeded", 30)])], last_event_id="30.1")
        assert kinds(events) == [("status", "succeeded")]
        assert requests[0]["last-event-id"] == "30.1"

    def test_503_is_retried_and_404_is_not(self) -> None:
        events, requests = self.stream([Reply(status=503, detail="database down"), Reply([status("cancelled", 0)])])
        assert kinds(events) == [("status", "cancelled")] and len(requests) == 2

        with pytest.raises(ApiError) as exc:
            self.stream([Reply(status=404, detail="job j1 not found")])
        assert (exc.value.status_code, exc.value.detail) == (404, "job j1 not found")

    def test_gives_up_after_max_reconnects(self) -> None:
        replies = [Reply([status("running", 0)], end="drop") for _ in range(3)]
        with pytest.raises(ServerUnreachable, match="lost the event stream of job j1 3 times"):
            self.stream(replies, max_reconnects=2)


class TestResolution:
    def test_explicit_then_environment_then_embedded_key_file(self, monkeypatch, tmp_path: Path) -> None:
        for name in ("DDPM_SERVER", "DDPM_API_KEY", "DDPM_HOST", "DDPM_PORT"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("DDPM_DATA_DIR", str(tmp_path))
        assert resolve_api_key() is None
        (tmp_path / "api-key").write_text("ddpm_from_file\n")
        assert resolve_api_key() == "ddpm_from_file"
        monkeypatch.setenv("DDPM_API_KEY", "ddpm_from_env")
        assert resolve_api_key() == "ddpm_from_env"
        assert resolve_api_key("ddpm_explicit") == "ddpm_explicit"

        assert resolve_server() == "http://127.0.0.1:8000"
        monkeypatch.setenv("DDPM_HOST", "0.0.0.0")
        monkeypatch.setenv("DDPM_PORT", "8123")
        assert resolve_server() == "http://127.0.0.1:8123"
        monkeypatch.setenv("DDPM_SERVER", "https://ddpm.example/")
        assert resolve_server() == "https://ddpm.example"
        assert resolve_server("http://other:1") == "http://other:1"

    def test_the_default_key_file_is_var_api_key(self, monkeypatch, tmp_path: Path) -> None:
        for name in ("DDPM_API_KEY", "DDPM_DATA_DIR"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.chdir(tmp_path)
        (tmp_path / "var").mkdir()
        (tmp_path / "var" / "api-key").write_text("ddpm_local\n")
        with DdpmClient() as c:
            assert c.api_key == "ddpm_local"

    def test_a_missing_key_says_where_keys_come_from(self, monkeypatch, tmp_path: Path) -> None:
        monkeypatch.delenv("DDPM_API_KEY", raising=False)
        monkeypatch.setenv("DDPM_DATA_DIR", str(tmp_path))
        transport = httpx.MockTransport(lambda r: httpx.Response(401, json={"detail": "missing API key"}))
        with DdpmClient("http://test", transport=transport) as c, pytest.raises(ApiError) as exc:
            c.get("j1")
        assert "pass --key, set DDPM_API_KEY" in str(exc.value)
