"""Two real `ddpm-jobs api` processes sharing PROMETHEUS_MULTIPROC_DIR, as several API workers on
one host: a scrape of either reports the requests and the open event streams of both, and with
DDPM_LOG_FORMAT=json every line they write is a JSON object."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MakeUser
from tests.e2e.conftest import running_api

TOKEN = "scrape-" + uuid.uuid4().hex
ROUTE = "/v1/jobs/{job_id}"


def scrape(base: str) -> dict[tuple[str, frozenset], float]:
    r = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    return {
        (s.name, frozenset((k, v) for k, v in s.labels.items() if k != "pid")): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def job_gets(scraped: dict) -> float:
    labels = frozenset({"method": "GET", "route": ROUTE, "status": "200"}.items())
    return scraped.get(("ddpm_http_request_duration_seconds_count", labels), 0.0)


def watchers(scraped: dict) -> float:
    return scraped.get(("ddpm_sse_watchers", frozenset()), 0.0)


@pytest.mark.e2e
@pytest.mark.slow
def test_two_api_processes_report_together_and_log_json(
    settings_env: dict[str, str], make_user: MakeUser, tmp_path: Path
) -> None:
    alice = make_user("alice")
    folder = tmp_path / "prometheus"
    folder.mkdir()
    env = settings_env | {"PROMETHEUS_MULTIPROC_DIR": str(folder)}
    settings = {"DDPM_METRICS_TOKEN": TOKEN, "DDPM_LOG_FORMAT": "json"}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    with running_api(env, tmp_path / "a", **settings) as a, running_api(env, tmp_path / "b", **settings) as b:
        ca, cb = (httpx.Client(base_url=base, headers=alice.headers, timeout=10) for base in (a, b))
        job_id = ca.post("/v1/jobs", json={}).json()["id"]  # queued: its event stream stays open
        for client, times in ((ca, 2), (cb, 3)):
            for _ in range(times):
                assert client.get(f"/v1/jobs/{job_id}").status_code == 200

        opened, close = threading.Event(), threading.Event()

        def watch() -> None:
            with ca.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
                lines = stream.iter_lines()  # kept: a dropped iterator closes the response
                assert next(lines) == "event: status"
                opened.set()
                close.wait(30)

        watcher = threading.Thread(target=watch)
        watcher.start()
        assert opened.wait(30)
        scraped = scrape(b)  # the other process
        assert job_gets(scraped) == 5 and watchers(scraped) == 1
        close.set()
        watcher.join()
        deadline = time.monotonic() + 20
        while watchers(scrape(a)) != 0:
            assert time.monotonic() < deadline, "the closed stream is still counted"
            time.sleep(0.2)

    for name in ("a", "b"):
        lines = [line for line in (tmp_path / name / "api.log").read_text().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]  # every line: one JSON object
        assert all({"time", "level", "logger", "message"} <= set(r) for r in records), records
        access = [r for r in records if r["logger"] == "uvicorn.access"]
        assert any(f"GET /v1/jobs/{job_id} HTTP/1.1" in r["message"] for r in access), access
