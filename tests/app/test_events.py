"""The event stream: replay from the database, Last-Event-ID, live fan-out over a real server."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from anyio import to_thread
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.exc import DataError

from app.auth.service import create_key, revoke_key
from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope, upgrade_database
from app.events.hub import EventHub, EventKey, InvalidEventId
from app.main import create_app
from app.models import Checkpoint, Job, JobEvent, MetricPoint, Sample
from tests.conftest import ApiUser
from tests.e2e.conftest import running_api


def parse_sse(text: str) -> list[dict]:
    """Events as dicts: {"event", "id" (or None), "data"}; comments are kept as {"comment"}."""
    events = []
    for block in text.strip().split("\n\n"):
        fields: dict = {"id": None}
        for line in block.splitlines():
            if line.startswith(":"):
                fields["comment"] = line[1:].strip()
            else:
                name, _, value = line.partition(": ")
                fields[name] = json.loads(value) if name == "data" else value
        events.append(fields)
    return events


class Rows:
    def __init__(self, settings: Settings, job_id: str) -> None:
        self.factory = make_sessionmaker(make_engine(settings))
        self.job_id = uuid.UUID(job_id)

    def metric(self, step: int) -> None:
        with session_scope(self.factory) as s:
            s.add(MetricPoint(job_id=self.job_id, step=step, loss=1.0 / step, lr=1e-4, images_per_s=10.0))

    def checkpoint(self, step: int) -> None:
        with session_scope(self.factory) as s:
            s.add(Checkpoint(job_id=self.job_id, step=step, path=f"x/{step}", size_bytes=1, sha256="a" * 64,
                             state_path=f"x/{step}.state"))  # fmt: skip

    def sample(self, step: int) -> None:
        with session_scope(self.factory) as s:
            s.add(Sample(job_id=self.job_id, step=step, path=f"x/{step}.png", size_bytes=1, sha256="b" * 64))

    def training_event(self, step: int, attempt: int = 1) -> int:
        """An oom_halved event of `attempt` at `step`; returns its id."""
        with session_scope(self.factory) as s:
            event = JobEvent(job_id=self.job_id, attempt=attempt, step=step, kind="oom_halved", message="halved",
                             detail={"micro_batch": 32, "was": 64, "batch": 128})  # fmt: skip
            s.add(event)
            s.flush()
            return event.id

    def status(self, status: str, **values: object) -> None:
        with session_scope(self.factory) as s:
            s.execute(update(Job).where(Job.id == self.job_id).values(status=status, **values))


@pytest.fixture
def job_id(client: TestClient) -> str:
    return client.post("/v1/jobs", json={}).json()["id"]


def keyed(events: list[dict]) -> list[tuple[str, str | None]]:
    return [(e["event"], e["id"]) for e in events if "event" in e]


class TestReplay:
    def test_a_finished_job_replays_in_step_order_and_the_stream_ends(
        self, client: TestClient, clean_db: Settings, job_id: str
    ) -> None:
        rows = Rows(clean_db, job_id)
        for step in (10, 20, 30):
            rows.metric(step)
        rows.checkpoint(20)
        rows.sample(20)
        first, second = rows.training_event(20), rows.training_event(20)  # two halvings at one step
        rows.status("succeeded", step=30)
        r = client.get(f"/v1/jobs/{job_id}/events")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.text)
        # The status snapshot first, the history, and the terminal status again as the last event.
        assert keyed(events) == [
            ("status", None),
            ("metric", "10.0"),
            ("metric", "20.0"),
            ("checkpoint", "20.1"),
            ("sample", "20.2"),
            ("training_event", f"20.4.{first}"),
            ("training_event", f"20.4.{second}"),
            ("metric", "30.0"),
            ("status", None),
        ]
        assert events[1]["data"] == {
            "step": 10,
            "loss": 0.1,
            "lr": 1e-4,
            "images_per_s": 10.0,
            "loss_by_t": None,
            "mfu": None,
            "peak_memory_bytes": None,
        }
        assert events[6]["data"] == {
            "id": second,
            "attempt": 1,
            "step": 20,
            "kind": "oom_halved",
            "message": "halved",
            "detail": {"micro_batch": 32, "was": 64, "batch": 128},
        }
        # Reconnecting after the first training event of a step sends the second, not the first.
        r = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": f"20.4.{first}"})
        assert keyed(parse_sse(r.text))[1:3] == [("training_event", f"20.4.{second}"), ("metric", "30.0")]
        assert events[4]["data"] == {"step": 20, "url": f"/v1/jobs/{job_id}/samples/20.png"}
        assert events[0]["data"] == events[-1]["data"]
        assert events[-1]["data"]["status"] == "succeeded" and events[-1]["data"]["id"] == job_id
        # Like GET /v1/jobs/{id}: the same job, queue included (no waiting reason once it ran).
        assert events[-1]["data"] == client.get(f"/v1/jobs/{job_id}").json()
        assert events[-1]["data"]["queue"] and events[-1]["data"]["waiting_reason"] is None

    def test_a_queued_jobs_status_says_where_and_why_it_waits(
        self, client: TestClient, clean_db: Settings, job_id: str
    ) -> None:
        async def first_event() -> dict:
            hub = EventHub(Rows(clean_db, job_id).factory, clean_db, poll_interval_s=0.05)
            stream = hub.stream(uuid.UUID(job_id), None)
            try:
                return parse_sse(await anext(stream))[0]
            finally:
                await stream.aclose()

        event = asyncio.run(first_event())
        shown = client.get(f"/v1/jobs/{job_id}").json()
        assert event["event"] == "status" and event["data"]["status"] == "queued"
        assert {k: event["data"][k] for k in ("queue", "waiting_reason")} == {
            "queue": shown["queue"],
            "waiting_reason": shown["waiting_reason"],
        }
        assert shown["waiting_reason"].startswith("no worker is running")

    def test_last_event_id_continues_after_it(self, client: TestClient, clean_db: Settings, job_id: str) -> None:
        rows = Rows(clean_db, job_id)
        for step in (10, 20, 30):
            rows.metric(step)
        rows.checkpoint(20)
        rows.sample(20)
        rows.status("failed", error="boom")
        r = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "20.1"})
        assert keyed(parse_sse(r.text)) == [("status", None), ("sample", "20.2"), ("metric", "30.0"), ("status", None)]
        r = client.get(f"/v1/jobs/{job_id}/events", params={"after": "30.0"})
        assert keyed(parse_sse(r.text)) == [("status", None)]  # nothing after it: the status once

    def test_a_bad_last_event_id_is_422_and_another_job_404(self, client: TestClient, job_id: str) -> None:
        r = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "ten"})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["header", "last-event-id"]
        assert client.get(f"/v1/jobs/{job_id}/events", params={"after": "1.7"}).status_code == 422
        assert client.get(f"/v1/jobs/{uuid.uuid4()}/events").status_code == 404

    @pytest.mark.parametrize(
        "raw", ["", "1", "1.5", "-1.0", "a.b", "1.0.0", "2147483648.0", "9999999999.2", "1.4", "1.4.-1", "1.4.1.1"]
    )
    def test_event_key_parsing_refuses_what_the_stream_never_sends(self, raw: str) -> None:
        with pytest.raises(InvalidEventId):
            EventKey.parse(raw)

    def test_event_keys_order_metric_checkpoint_sample_within_a_step(self) -> None:
        keys = [EventKey.parse(k) for k in ["20.2", "10.0", "20.4.9", "20.0", "20.1", "3.2", "20.4.11", "3.4.12"]]
        assert [str(k) for k in sorted(keys)] == ["3.2", "3.4.12", "10.0", "20.0", "20.1", "20.2", "20.4.9", "20.4.11"]


@pytest.fixture
def sqlite_client(tmp_path: Path) -> Iterator[TestClient]:
    """The embedded mode's app (SQLite under tmp_path) with an admin key of its own."""
    settings = Settings(data_dir=tmp_path)
    upgrade_database(settings)
    with session_scope(make_sessionmaker(make_engine(settings))) as s:
        key = create_key(s, settings.secret_key, "local", admin=True).key
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


@pytest.fixture(params=["postgresql", "sqlite"])
def any_client(request: pytest.FixtureRequest) -> TestClient:
    return request.getfixturevalue("client" if request.param == "postgresql" else "sqlite_client")


class TestOutOfRangeIds:
    # A finished job: a stream that accepted the id would answer 200 at once (or, on
    # PostgreSQL, loop on "integer out of range" for ever; the timeout catches that).
    @pytest.mark.timeout(30)
    @pytest.mark.parametrize(("where", "loc"), [("query", ["query", "after"]), ("header", ["header", "last-event-id"])])
    def test_an_id_past_the_database_integer_is_422_naming_the_field(
        self, any_client: TestClient, where: str, loc: list[str]
    ) -> None:
        job_id = any_client.post("/v1/jobs", json={}).json()["id"]
        assert any_client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        raw = "9999999999.2"
        if where == "query":
            r = any_client.get(f"/v1/jobs/{job_id}/events", params={"after": raw})
        else:
            r = any_client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": raw})
        assert r.status_code == 422
        assert [e["loc"] for e in r.json()["detail"]] == [loc]

    @pytest.mark.timeout(30)
    def test_one_watchers_position_never_moves_anothers_stream(self, clean_db: Settings, job_id: str) -> None:
        rows = Rows(clean_db, job_id)
        rows.status("running")
        rows.metric(10)
        job = uuid.UUID(job_id)

        def produce() -> None:
            rows.metric(20)
            rows.checkpoint(20)
            rows.metric(30)
            rows.status("succeeded", step=30)

        async def watch() -> list[dict]:
            hub = EventHub(rows.factory, clean_db, poll_interval_s=0.05)
            # The first watcher (the one whose arrival starts the job's feed) is past anything
            # the job will write; a second one is past the database's integer: its replay fails.
            ahead = hub.stream(job, EventKey(999_999_999, 2))
            assert parse_sse(await anext(ahead))[0]["event"] == "status"
            broken = hub.stream(job, EventKey(2**40, 0))
            with pytest.raises(DataError):
                await anext(broken)
            behind = hub.stream(job, None)
            got = [await anext(behind), await anext(behind)]  # the status, metric 10
            await to_thread.run_sync(produce)
            got += [text async for text in behind]
            await ahead.aclose()
            return parse_sse("".join(got))

        events = asyncio.run(watch())
        assert keyed(events) == [
            ("status", None),
            ("metric", "10.0"),
            ("metric", "20.0"),
            ("checkpoint", "20.1"),
            ("metric", "30.0"),
            ("status", None),
        ]
        assert events[-1]["data"]["status"] == "succeeded"


def live_api(settings_env: dict[str, str], tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real `ddpm-jobs api` process polling for events every 0.1 s; yields its base URL."""
    return running_api(settings_env, tmp_path, DDPM_EVENTS_POLL_INTERVAL_S="0.1")


@pytest.mark.e2e
class TestLive:
    def test_watchers_get_every_event_once_across_a_reconnect(
        self, clean_db: Settings, settings_env: dict[str, str], alice: ApiUser, tmp_path
    ) -> None:
        with live_api(settings_env, tmp_path) as base:
            client = httpx.Client(base_url=base, headers=alice.headers, timeout=30)
            job_id = client.post("/v1/jobs", json={}).json()["id"]
            rows = Rows(clean_db, job_id)
            rows.status("running")

            def produce() -> None:
                for step in range(10, 101, 10):
                    rows.metric(step)
                    if step % 50 == 0:
                        rows.checkpoint(step)
                    time.sleep(0.05)
                rows.status("succeeded", step=100)

            received: list[dict] = []
            # More watchers than the database pool has connections (10 + 10): streams must not hold one.
            watchers: list[list[dict]] = [[] for _ in range(30)]

            def watch(into: list[dict]) -> None:
                with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                    into += parse_sse(r.read().decode())

            threads = [threading.Thread(target=watch, args=(w,)) for w in watchers]
            for t in threads:
                t.start()
            time.sleep(0.5)
            producer = threading.Thread(target=produce)
            producer.start()
            # One watcher drops after its fourth keyed event and reconnects with Last-Event-ID.
            with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                buffer = ""
                for chunk in r.iter_text():
                    buffer += chunk
                    got = [e for e in parse_sse(buffer.rsplit("\n\n", 1)[0]) if e.get("id")]
                    if len(got) >= 4:
                        received += got[:4]
                        break
            with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": received[-1]["id"]}) as r:
                received += parse_sse(r.read().decode())
            producer.join()
            for t in threads:
                t.join(timeout=30)
        expected_all = sorted([f"{s}.0" for s in range(10, 101, 10)] + ["50.1", "100.1"], key=EventKey.parse)
        for events in [*watchers, received]:
            ids = [e["id"] for e in events if e.get("id")]
            assert ids == expected_all  # no gap, no repeat
            statuses = [e["data"]["status"] for e in events if e.get("event") == "status"]
            assert statuses[-1] == "succeeded"

    def test_a_stream_ends_within_seconds_of_its_keys_revocation(
        self, clean_db: Settings, settings_env: dict[str, str], alice: ApiUser, tmp_path: Path
    ) -> None:
        with live_api(settings_env, tmp_path) as base:
            client = httpx.Client(base_url=base, headers=alice.headers, timeout=10)
            job_id = client.post("/v1/jobs", json={}).json()["id"]
            rows = Rows(clean_db, job_id)
            rows.status("running")
            with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                chunks = r.iter_text()
                assert "event: status" in next(chunks)
                with session_scope(rows.factory) as s:
                    revoke_key(s, alice.prefix)
                revoked_at = time.monotonic()
                rest = "".join(chunks)  # a stream that outlives the key runs into the read timeout
                ended_after = time.monotonic() - revoked_at
            assert ended_after < 5, ended_after
            assert "event: metric" not in rest
            assert client.get(f"/v1/jobs/{job_id}/events").status_code == 401
