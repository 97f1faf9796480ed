"""Input an attacker with a valid key can send: every answer is a 4xx naming the field, never a
500, on PostgreSQL and on the embedded SQLite alike (issue 12, items 2 and 3)."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.auth.service import create_key
from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope, upgrade_database
from app.main import create_app

JSON = {"content-type": "application/json"}


@pytest.fixture(params=["postgresql", "sqlite"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestClient]:
    """A client with a fresh user's key, against the service (PostgreSQL) or the embedded mode."""
    if request.param == "postgresql":
        settings: Settings = request.getfixturevalue("clean_db")
    else:
        settings = Settings(data_dir=tmp_path / "var")
        upgrade_database(settings)
    engine = make_engine(settings)
    with session_scope(make_sessionmaker(engine)) as s:
        key = create_key(s, settings.secret_key, "mallory").key
    engine.dispose()
    # A 500 comes back as a response, so the assertion shows the status instead of a traceback.
    with TestClient(
        create_app(settings), headers={"Authorization": f"Bearer {key}"}, raise_server_exceptions=False
    ) as c:
        yield c


def _cursor(payload: object) -> str:
    """A cursor as encode_cursor spells them, around anything."""
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


class TestLoneSurrogates:
    """`\\ud800` is JSON's escape of a lone surrogate, which UTF-8 cannot encode; the bodies go
    as raw bytes so that the client does not re-encode them."""

    @pytest.mark.parametrize(
        ("body", "loc"),
        [
            (r'{"name": "\ud800"}', ["body", "name"]),
            (r'{"\ud800": 1}', ["body"]),
            (r'{"training": {"\ud800": 1}}', ["body", "training"]),
            (r'{"training": {"compile": "\ud800"}}', ["body", "training", "compile"]),
            (r'{"dataset": {"kind": "folder", "path": "\ud800"}}', ["body", "dataset", "path"]),
            (r'{"model": {"preset": "\ud800"}}', ["body", "model", "preset"]),
        ],
    )
    def test_a_job_spec_is_422_naming_the_field(self, api: TestClient, body: str, loc: list[str]) -> None:
        r = api.post("/v1/jobs", content=body.encode(), headers=JSON)
        assert r.status_code == 422, r.text
        [error] = r.json()["detail"]
        assert error["loc"] == loc
        assert error["input"] == r"\ud800"  # echoed with a backslash escape, as valid UTF-8
        assert api.get("/v1/jobs").json()["items"] == []

    def test_a_sample_request_is_422_naming_the_sampler(self, api: TestClient) -> None:
        body = rb'{"sampler": "\ud800"}'
        r = api.post(f"/v1/jobs/{uuid.uuid4()}/sample", content=body, headers=JSON)
        assert r.status_code == 422, r.text
        assert [(e["loc"], e["input"]) for e in r.json()["detail"]] == [(["body", "sampler"], r"\ud800")]

    def test_a_body_that_is_not_utf8_is_422(self, api: TestClient) -> None:
        r = api.post("/v1/jobs", content=b"\xff\xfe", headers={"content-type": "text/plain"})
        assert r.status_code == 422, r.text
        assert [(e["loc"], e["input"]) for e in r.json()["detail"]] == [(["body"], r"\xff\xfe")]


class TestCursors:
    def test_the_api_s_own_cursors_page_through_every_job(self, api: TestClient) -> None:
        ids = [api.post("/v1/jobs", json={"name": f"j{i}"}).json()["id"] for i in range(3)]
        seen, cursor = [], None
        while True:
            page = api.get("/v1/jobs", params={"limit": 1} | ({"cursor": cursor} if cursor else {})).json()
            seen += [j["id"] for j in page["items"]]
            if (cursor := page["next_cursor"]) is None:
                break
        assert seen == list(reversed(ids))

    @pytest.mark.parametrize(
        "cursor",
        [
            pytest.param(_cursor(["0001-01-01T00:00:00+05:00", str(uuid.uuid4())]), id="before-year-1-in-utc"),
            pytest.param(_cursor(["9999-12-31T23:59:59-05:00", str(uuid.uuid4())]), id="after-year-9999-in-utc"),
            pytest.param(_cursor(["2024-01-01T00:00:00+00:00", 5]), id="number-for-id"),
            pytest.param(_cursor(["2024-01-01T00:00:00+00:00", None]), id="null-for-id"),
            pytest.param(_cursor([1_700_000_000, str(uuid.uuid4())]), id="number-for-time"),
            pytest.param(_cursor({"2024-01-01T00:00:00+00:00": 1, str(uuid.uuid4()): 2}), id="object-of-two-keys"),
            pytest.param(_cursor(["2024-01-01T00:00:00", str(uuid.uuid4())]), id="naive-time"),
            pytest.param(_cursor(["2024-01-01T00:00:00+00:00", str(uuid.uuid4()), "x"]), id="three-parts"),
            pytest.param(_cursor(["2024-01-01 00:00:00+00:00", str(uuid.uuid4())]), id="not-as-the-api-writes-it"),
            pytest.param(base64.urlsafe_b64encode(b"\xff\xfe").decode(), id="not-utf8"),
            pytest.param("not-a-cursor", id="not-base64"),
        ],
    )
    def test_any_other_cursor_is_422_naming_it(self, api: TestClient, cursor: str) -> None:
        api.post("/v1/jobs", json={})
        r = api.get("/v1/jobs", params={"cursor": cursor})
        assert r.status_code == 422, r.text
        assert [e["loc"] for e in r.json()["detail"]] == [["query", "cursor"]]

    def test_positions_at_the_edges_of_time_are_answered(self, api: TestClient) -> None:
        job = api.post("/v1/jobs", json={}).json()["id"]
        first = api.get("/v1/jobs", params={"cursor": _cursor(["0001-01-01T00:00:00+00:00", str(uuid.UUID(int=0))])})
        assert first.status_code == 200, first.text
        assert first.json() == {"items": [], "next_cursor": None}
        last = _cursor(["9999-12-31T23:59:59.999999+00:00", str(uuid.UUID(int=2**128 - 1))])
        assert [j["id"] for j in api.get("/v1/jobs", params={"cursor": last}).json()["items"]] == [job]


class TestMetricPages:
    @pytest.mark.parametrize(
        ("params", "field"),
        [
            ({"after_step": -2}, "after_step"),
            ({"after_step": 2**31}, "after_step"),
            ({"after_step": 10**40}, "after_step"),
            ({"after_step": "1e3"}, "after_step"),
            ({"limit": 0}, "limit"),
            ({"limit": 10_001}, "limit"),
        ],
    )
    def test_out_of_range_is_422_naming_the_field(self, api: TestClient, params: dict, field: str) -> None:
        job = api.post("/v1/jobs", json={}).json()["id"]
        r = api.get(f"/v1/jobs/{job}/metrics", params=params)
        assert r.status_code == 422, r.text
        assert [e["loc"] for e in r.json()["detail"]] == [["query", field]]

    def test_the_largest_step_is_answered(self, api: TestClient) -> None:
        job = api.post("/v1/jobs", json={}).json()["id"]
        r = api.get(f"/v1/jobs/{job}/metrics", params={"after_step": 2**31 - 1})
        assert r.json() == {"items": [], "next_after_step": None}
