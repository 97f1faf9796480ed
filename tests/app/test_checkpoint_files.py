"""Downloads (app/checkpoints/files.py): Range and conditional requests as RFC 9110 asks, with
the same answers, status and headers alike, from local storage and from S3 (moto)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.app.test_storage import add_checkpoint
from tests.conftest import MakeUser

PAYLOAD = bytes(range(256)) * 40
SIZE, SHA = len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest()
ETAG = f'"{SHA}"'

# Request headers → status, and for a 206 the inclusive byte span sent; the same on every store.
CASES: dict[str, tuple[dict[str, str], int, tuple[int, int] | None]] = {
    "no Range": ({}, 200, None),
    "a range": ({"Range": "bytes=100-199"}, 206, (100, 199)),
    "the unit in capitals": ({"Range": "BYTES=0-9"}, 206, (0, 9)),
    "an open range": ({"Range": "bytes=10000-"}, 206, (10000, SIZE - 1)),
    "a suffix": ({"Range": "bytes=-5"}, 206, (SIZE - 5, SIZE - 1)),
    "past the end": ({"Range": f"bytes=10-{SIZE + 50}"}, 206, (10, SIZE - 1)),
    "bad syntax": ({"Range": "bytes=abc"}, 200, None),
    "another unit": ({"Range": "items=0-5"}, 200, None),
    "last before first": ({"Range": "bytes=5-1"}, 200, None),
    "no positions": ({"Range": "bytes=-"}, 200, None),
    "several ranges": ({"Range": "bytes=0-1,5-6"}, 200, None),
    "starts at the end": ({"Range": f"bytes={SIZE}-"}, 416, None),
    "an empty suffix": ({"Range": "bytes=-0"}, 416, None),
    "If-None-Match: the ETag": ({"If-None-Match": ETAG}, 304, None),
    "If-None-Match: in a list, weak": ({"If-None-Match": f'"other", W/{ETAG}'}, 304, None),
    "If-None-Match: *": ({"If-None-Match": "*", "Range": "bytes=0-9"}, 304, None),
    "If-None-Match: another tag": ({"If-None-Match": '"other"'}, 200, None),
    "If-Range: the ETag": ({"If-Range": ETAG, "Range": "bytes=0-9"}, 206, (0, 9)),
    "If-Range: another tag": ({"If-Range": '"other"', "Range": "bytes=0-9"}, 200, None),
    "If-Range: weak": ({"If-Range": f"W/{ETAG}", "Range": "bytes=0-9"}, 200, None),
    "If-Range: a date": ({"If-Range": "Wed, 21 Oct 2015 07:28:00 GMT", "Range": "bytes=0-9"}, 200, None),
    "If-Range without Range": ({"If-Range": '"other"'}, 200, None),
}


def _client(settings: Settings, make_user: MakeUser) -> Iterator[tuple[TestClient, str]]:
    with TestClient(create_app(settings), headers=make_user().headers) as client:
        job_id = client.post("/v1/jobs", json={}).json()["id"]
        add_checkpoint(settings, job_id, 10, PAYLOAD)
        yield client, f"/v1/jobs/{job_id}/checkpoints/10"


@pytest.fixture
def local(clean_db: Settings, make_user: MakeUser) -> Iterator[tuple[TestClient, str]]:
    yield from _client(clean_db, make_user)


@pytest.fixture
def s3(s3_settings: Settings, make_user: MakeUser) -> Iterator[tuple[TestClient, str]]:
    yield from _client(s3_settings, make_user)


def _seen(response: httpx.Response) -> dict[str, object]:
    """What a client sees, but for what differs by store and request on purpose (the file's name,
    which carries the job id, and the date)."""
    headers = {k: v for k, v in response.headers.items() if k not in {"date", "content-disposition"}}
    return {"status": response.status_code, "headers": headers, "body": response.content}


class TestRangeAndConditionalRequests:
    def test_every_case_on_both_stores(self, local: tuple[TestClient, str], s3: tuple[TestClient, str]) -> None:
        for case, (headers, status, span) in CASES.items():
            on_local, on_s3 = (client.get(url, headers=headers) for client, url in (local, s3))
            assert _seen(on_local) == _seen(on_s3), case
            assert on_local.status_code == status, (case, on_local.text)
            if status == 416:
                assert on_local.headers["content-range"] == f"bytes */{SIZE}", case
                continue
            assert on_local.headers["etag"] == ETAG, case
            if status == 304:
                assert on_local.content == b"" and "content-length" not in on_local.headers, case
            elif span is None:
                assert on_local.content == PAYLOAD and "content-range" not in on_local.headers, case
            else:
                assert on_local.content == PAYLOAD[span[0] : span[1] + 1], case
                assert on_local.headers["content-range"] == f"bytes {span[0]}-{span[1]}/{SIZE}", case

    def test_an_export_ignores_range(self, local: tuple[TestClient, str], clean_db: Settings) -> None:
        client, url = local
        job_id = url.split("/")[3]
        header = json.dumps({"__metadata__": {"unet_config": json.dumps({"sample_size": 8})}}).encode()
        add_checkpoint(clean_db, job_id, 20, len(header).to_bytes(8, "little") + header)
        for value in ("bytes=abc", "bytes=0-9"):
            r = client.get(f"/v1/jobs/{job_id}/checkpoints/20/export", headers={"Range": value})
            assert r.status_code == 200, (value, r.text)
            assert zipfile.ZipFile(io.BytesIO(r.content)).read("unet/config.json")
