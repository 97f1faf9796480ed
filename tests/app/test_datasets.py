"""The HTTP side of users' data sets (POST/PATCH/GET/DELETE /v1/datasets) against the test
PostgreSQL and Redis: uploads of every kind (raw zip/tar/gzip bodies, forms, resumed with PATCH),
their limits (413, 415, 429), source URIs, listing, previews, deletion, and jobs on a data set.
What needs a real connection (a client that goes away mid-body, two PATCHes at once, a trickling
client) runs against a real uvicorn server with app/server.py's protocol, in this process."""

from __future__ import annotations

import fcntl
import hashlib
import io
import socket
import tarfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import Settings
from app.datasets.keys import preview_key
from app.datasets.repository import DatasetRepository
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import Dataset, Job
from bench.common import api_in_thread
from tests.conftest import ApiUser, MakeUser, bucket_keys, s3_client

PNG = b"\x89PNG\r\n\x1a\n" + b"preview" * 10


def zip_archive(files: int = 3, size: int = 2000) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(files):
            archive.writestr(f"img-{i}.png", uuid.uuid4().bytes * (size // 16))
    return buffer.getvalue()


def tar_archive(gz: bool = False, size: int = 2000) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as archive:
        data = uuid.uuid4().bytes * (size // 16)
        info = tarfile.TarInfo("a/img.png")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def rows(settings: Settings) -> list[Dataset]:
    engine = make_engine(settings)
    try:
        with session_scope(make_sessionmaker(engine)) as s:
            return list(s.scalars(select(Dataset).order_by(Dataset.created_at)))
    finally:
        engine.dispose()


def make_ready(settings: Settings, dataset_id: str, image_count: int = 12) -> None:
    """What a worker's preparation leaves: ready, with counts and a preview file."""
    key = preview_key(dataset_id)
    path = settings.checkpoint_root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PNG)
    engine = make_engine(settings)
    with session_scope(make_sessionmaker(engine)) as s:
        DatasetRepository(s).update(
            uuid.UUID(dataset_id),
            status="ready",
            image_count=image_count,
            skipped=0,
            sha256="ab" * 32,
            preview_key=key,
            preview_sha256=hashlib.sha256(PNG).hexdigest(),
            preview_bytes=len(PNG),
        )
    engine.dispose()


def upload(client: TestClient, data: bytes, content_type: str = "application/zip", **headers: str) -> httpx.Response:
    return client.post("/v1/datasets", content=data, headers={"Content-Type": content_type, **headers})


def stored(settings: Settings, dataset: dict) -> bytes:
    return (settings.checkpoint_root / f"datasets/{dataset['id']}/upload.{dataset['format']}").read_bytes()


@pytest.fixture
def settings(clean_db: Settings, tmp_path: Path) -> Settings:
    """The test database, and a checkpoint root of this test's own (to see what it leaves there)."""
    return clean_db.model_copy(update={"checkpoint_dir": tmp_path / "checkpoints"})


@pytest.fixture
def client(settings: Settings, alice: ApiUser) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=alice.headers) as c:
        yield c


# --- uploads ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content_type", "fmt", "archive"),
    [
        ("application/zip", "zip", zip_archive),
        ("application/x-zip-compressed", "zip", zip_archive),
        ("application/x-tar", "tar", tar_archive),
        ("application/gzip", "tar.gz", partial(tar_archive, gz=True)),
        ("application/x-gzip; charset=binary", "tar.gz", partial(tar_archive, gz=True)),
    ],
)
def test_a_raw_upload_is_stored_hashed_and_sent_to_preparation(
    client: TestClient, settings: Settings, content_type: str, fmt: str, archive
) -> None:
    data = archive()
    r = client.post("/v1/datasets?name=faces", content=data, headers={"Content-Type": content_type})
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["Location"] == f"/v1/datasets/{body['id']}"
    assert (body["status"], body["format"], body["name"], body["source"]) == ("preparing", fmt, "faces", "upload")
    assert body["archive_sha256"] == hashlib.sha256(data).hexdigest()
    assert body["received_bytes"] == body["size_bytes"] == len(data)
    assert body["preview_url"] is None
    assert stored(settings, body) == data
    client.app.state.dispatcher.drain()  # the prepare task went to the broker after the commit
    assert rows(settings)[0].dispatched_at is not None


def test_an_upload_larger_than_the_general_body_limit_is_accepted(client: TestClient, settings: Settings) -> None:
    data = zip_archive(files=2, size=settings.max_request_bytes + 4096)
    assert len(data) > settings.max_request_bytes
    r = upload(client, data)
    assert r.status_code == 201, r.text
    assert r.json()["archive_sha256"] == hashlib.sha256(data).hexdigest()
    # Other routes keep the general limit.
    assert client.post("/v1/jobs", content=b"{" + b" " * settings.max_request_bytes + b"}").status_code == 413


def test_a_streamed_body_without_content_length_is_stored(client: TestClient, settings: Settings) -> None:
    data = tar_archive(size=300_000)
    chunks = (data[i : i + 7000] for i in range(0, len(data), 7000))
    r = client.post("/v1/datasets", content=chunks, headers={"Content-Type": "application/x-tar"})
    assert r.status_code == 201, r.text
    assert r.json()["archive_sha256"] == hashlib.sha256(data).hexdigest()
    assert stored(settings, r.json()) == data


@pytest.mark.parametrize("name_first", [True, False])
def test_a_form_upload_streams_its_file_part(client: TestClient, settings: Settings, name_first: bool) -> None:
    data = tar_archive(gz=True, size=200_000)
    fields = [("name", (None, "cats"))]
    file = [("file", ("cats.tgz", data, "application/octet-stream"))]  # the format from the filename
    r = client.post("/v1/datasets", files=fields + file if name_first else file + fields)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["status"], body["format"], body["name"]) == ("preparing", "tar.gz", "cats")
    assert body["archive_sha256"] == hashlib.sha256(data).hexdigest()
    assert stored(settings, body) == data


def test_a_form_part_type_names_the_format(client: TestClient, settings: Settings) -> None:
    data = zip_archive()
    r = client.post("/v1/datasets?name=from-query", files={"file": ("blob", data, "application/zip")})
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "zip" and stored(settings, r.json()) == data
    assert r.json()["name"] == "from-query"


@pytest.mark.parametrize(
    ("files", "loc"),
    [
        ({"file": ("notes.txt", b"hello", "text/plain")}, ["body", "file"]),
        ({"name": (None, "no file")}, ["body", "file"]),
        ({"file": ("a.zip", b"PK", "application/zip"), "name": (None, "x" * 201)}, ["body", "name"]),
        (
            [("file", ("a.zip", b"PK", "application/zip")), ("file", ("b.zip", b"PK", "application/zip"))],
            ["body", "file"],
        ),
    ],
    ids=["not-an-archive", "no-file", "long-name", "two-files"],
)
def test_a_bad_form_is_422_naming_the_field_and_stores_nothing(
    client: TestClient, settings: Settings, files, loc: list[str]
) -> None:
    r = client.post("/v1/datasets", files=files)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc
    assert rows(settings) == []
    assert not list((settings.checkpoint_root / "datasets").glob("*/upload.*"))


def test_a_form_without_a_boundary_or_with_a_huge_part_head_is_422(client: TestClient, settings: Settings) -> None:
    r = client.post("/v1/datasets", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "content-type"], r.text
    head = b"--xyz\r\nContent-Disposition: form-data; name=file; filename=a.zip\r\nX-Pad: " + b"a" * 20_000
    form = {"Content-Type": "multipart/form-data; boundary=xyz"}
    r = client.post("/v1/datasets", content=head + b"\r\n\r\nPK\r\n--xyz--\r\n", headers=form)
    assert r.status_code == 422 and "header size" in r.text, r.text
    assert rows(settings) == []


def test_a_form_cut_short_is_422(client: TestClient, settings: Settings) -> None:
    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n\r\nPK\x03\x04'
    r = client.post("/v1/datasets", content=head, headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"], r.text
    assert rows(settings) == []


def test_upload_in_parts_with_patch(client: TestClient, settings: Settings) -> None:
    data = zip_archive(files=4, size=50_000)
    half = len(data) // 2
    r = upload(client, data[:half], **{"Upload-Complete": "?0", "Upload-Length": str(len(data))})
    assert r.status_code == 201, r.text
    first = r.json()
    assert (first["status"], first["received_bytes"], first["upload_length"]) == ("uploading", half, len(data))
    assert r.headers["Upload-Offset"] == str(half)
    url = f"/v1/datasets/{first['id']}/upload"

    wrong = client.patch(url, content=data[half:], headers={"Upload-Offset": "3"})
    assert wrong.status_code == 409 and wrong.headers["Upload-Offset"] == str(half), wrong.text
    assert str(half) in wrong.json()["detail"]

    more = client.patch(
        url, content=data[half : half + 10], headers={"Upload-Offset": str(half), "Upload-Complete": "?0"}
    )
    assert more.status_code == 200 and more.json()["received_bytes"] == half + 10
    # Complete, but short of Upload-Length: 409 with the offset to go on from.
    short = client.patch(url, content=b"", headers={"Upload-Offset": str(half + 10)})
    assert short.status_code == 409 and short.headers["Upload-Offset"] == str(half + 10)
    done = client.patch(url, content=data[half + 10 :], headers={"Upload-Offset": str(half + 10)})
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "preparing"
    assert done.json()["archive_sha256"] == hashlib.sha256(data).hexdigest()
    assert stored(settings, done.json()) == data
    again = client.patch(url, content=b"x", headers={"Upload-Offset": str(len(data))})
    assert again.status_code == 409 and "preparing" in again.json()["detail"]


def test_a_patch_while_another_holds_the_upload_is_409(client: TestClient, settings: Settings) -> None:
    r = upload(client, b"PK\x03\x04", **{"Upload-Complete": "?0"})
    part = settings.checkpoint_root / f"datasets/{r.json()['id']}/upload.zip"
    with part.open("ab") as other:  # what a PATCH in progress holds
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        busy = client.patch(f"/v1/datasets/{r.json()['id']}/upload", content=b"x", headers={"Upload-Offset": "4"})
    assert busy.status_code == 409 and "another request" in busy.json()["detail"], busy.text
    assert part.read_bytes() == b"PK\x03\x04"


def test_patch_needs_an_offset_and_an_uploading_data_set_of_ones_own(
    client: TestClient, settings: Settings, make_user: MakeUser
) -> None:
    r = upload(client, b"PK", **{"Upload-Complete": "?0"})
    url = f"/v1/datasets/{r.json()['id']}/upload"
    assert client.patch(url, content=b"x").status_code == 422  # no Upload-Offset
    assert client.patch(url, content=b"x", headers={"Upload-Offset": "2", "Upload-Complete": "yes"}).status_code == 422
    bob = make_user("bob")
    theirs = client.patch(url, content=b"x", headers={"Upload-Offset": "2", **bob.headers})
    assert theirs.status_code == 404


def test_an_empty_archive_is_422(client: TestClient, settings: Settings) -> None:
    r = upload(client, b"")
    assert r.status_code == 422 and "empty" in r.text
    assert rows(settings) == []


# --- limits ----------------------------------------------------------------------------------
@pytest.fixture
def limited(settings: Settings, alice: ApiUser) -> Iterator[TestClient]:
    settings = settings.model_copy(
        update={"max_dataset_bytes": 10_000, "dataset_quota_bytes": 25_000, "max_datasets_per_user": 3}
    )
    with TestClient(create_app(settings), headers=alice.headers) as c:
        yield c


def test_an_upload_over_the_size_limit_is_413_upfront_and_while_streaming(
    limited: TestClient, settings: Settings
) -> None:
    big = b"\0" * 10_001
    upfront = upload(limited, big)
    assert upfront.status_code == 413 and "10000" in upfront.text and "DDPM_MAX_DATASET_BYTES" in upfront.text
    declared = upload(limited, b"PK", **{"Upload-Length": "20000", "Upload-Complete": "?0"})
    assert declared.status_code == 413
    streamed = limited.post(
        "/v1/datasets", content=iter([big[:6000], big[6000:]]), headers={"Content-Type": "application/zip"}
    )
    assert streamed.status_code == 413, streamed.text
    form = limited.post("/v1/datasets", files={"file": ("a.zip", big, "application/zip")})
    assert form.status_code == 413, form.text
    assert rows(settings) == []  # the rows of refused uploads are gone, and their bytes
    assert not list((settings.checkpoint_root / "datasets").glob("*/upload.*"))


def test_a_patch_past_the_limit_is_413_and_the_upload_goes(limited: TestClient, settings: Settings) -> None:
    r = upload(limited, b"\0" * 6000, **{"Upload-Complete": "?0"})
    url = f"/v1/datasets/{r.json()['id']}/upload"
    over = limited.patch(url, content=iter([b"\0" * 5000]), headers={"Upload-Offset": "6000"})
    assert over.status_code == 413
    assert rows(settings) == []


def test_the_per_user_count_and_storage_quota_are_429_naming_limit_and_usage(limited: TestClient) -> None:
    for _ in range(2):
        assert upload(limited, b"\0" * 9000).status_code == 201
    over = upload(limited, b"\0" * 9000)  # 18000 used + 9000 > 25000
    assert over.status_code == 429
    assert "18000" in over.text and "25000" in over.text and "DDPM_DATASET_QUOTA_BYTES" in over.text
    assert upload(limited, b"\0" * 100).status_code == 201
    count = limited.post("/v1/datasets", json={"source": "hf://a/b"})
    assert count.status_code == 429 and "3" in count.text and "DDPM_MAX_DATASETS_PER_USER" in count.text


def test_other_content_types_are_415_naming_the_accepted_ones(client: TestClient) -> None:
    for content_type in ("text/plain", "application/octet-stream", ""):
        r = client.post("/v1/datasets", content=b"PK", headers={"Content-Type": content_type})
        assert r.status_code == 415, (content_type, r.text)
        assert "application/zip" in r.text and "multipart/form-data" in r.text and "application/json" in r.text


# --- sources ---------------------------------------------------------------------------------
def test_a_source_is_preparing_at_once(client: TestClient, settings: Settings) -> None:
    r = client.post("/v1/datasets", json={"source": "hf://ylecun/mnist", "name": "digits"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["status"], body["source"], body["split"], body["name"]) == (
        "preparing",
        "hf://ylecun/mnist",
        "train",
        "digits",
    )
    r = client.post("/v1/datasets", json={"source": "https://example.com/data/images.tar.gz"})
    assert r.status_code == 201 and r.json()["split"] is None
    client.app.state.dispatcher.drain()
    assert all(row.dispatched_at is not None for row in rows(settings))


@pytest.mark.parametrize(
    "body",
    [
        {"source": "ftp://example.com/a.zip"},
        {"source": "file:///etc/passwd"},
        {"source": "hf://only-a-name"},
        {"source": "hf://../secrets"},
        {"source": "hf://a/b/c"},
        {"source": "https://user:pw@example.com/a.zip"},
        {"source": "https://example.com/a\x00.zip"},
        {"source": "https://exa mple.com/a.zip"},
        {"source": "https:///a.zip"},
        {"source": "https://example.com:99999/a.zip"},
        {"source": "https://" + "a" * 2050},
        {"source": "s3://Not_A_Bucket/x"},
        {"source": "https://example.com/a.zip", "split": "train"},
        {"source": "hf://a/b", "split": "train; rm"},
        {"source": "hf://a/b", "unknown": 1},
        {"source": "https://127.0.0.1/a.zip"},
        {"source": "https://127.1/a.zip"},
        {"source": "https://localhost/a.zip"},
        {"source": "https://api.localhost./a.zip"},
        {"source": "https://[::1]/a.zip"},
        {"source": "https://[::ffff:10.0.0.1]/a.zip"},
        {"source": "https://10.1.2.3/a.zip"},
        {"source": "https://192.168.0.1:8443/a.zip"},
        {"source": "https://169.254.169.254/latest/meta-data"},
        {"source": "https://0.0.0.0/a.zip"},
        {"source": "https://240.0.0.1/a.zip"},
        {"source": "s3://bucket/prefix/"},  # this service stores locally
    ],
)
def test_a_bad_or_forbidden_source_is_422_on_its_field(client: TestClient, settings: Settings, body: dict) -> None:
    r = client.post("/v1/datasets", json=body)
    assert r.status_code == 422, (body, r.text)
    assert r.json()["detail"][0]["loc"][0] == "body", r.text
    assert rows(settings) == []


def test_private_addresses_are_allowed_when_configured(settings: Settings, alice: ApiUser) -> None:
    settings = settings.model_copy(update={"dataset_url_allow_private": True})
    with TestClient(create_app(settings), headers=alice.headers) as c:
        assert c.post("/v1/datasets", json={"source": "https://127.0.0.1:8443/a.zip"}).status_code == 201


def test_a_json_body_that_is_not_a_source_is_422(client: TestClient) -> None:
    for content in (b"{", b"[]", b'{"source": 3}', b"\xff"):
        r = client.post("/v1/datasets", content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (content, r.text)


# --- reading, listing, deleting -----------------------------------------------------------------
def test_list_get_cursor_and_status_filter(client: TestClient, settings: Settings) -> None:
    ids = [upload(client, zip_archive(files=1), **{"Upload-Complete": "?0"}).json()["id"] for _ in range(3)]
    ids.append(client.post("/v1/datasets", json={"source": "hf://a/b"}).json()["id"])
    page = client.get("/v1/datasets", params={"limit": 3}).json()
    assert [d["id"] for d in page["items"]] == ids[::-1][:3] and page["next_cursor"]
    rest = client.get("/v1/datasets", params={"limit": 3, "cursor": page["next_cursor"]}).json()
    assert [d["id"] for d in rest["items"]] == [ids[0]] and rest["next_cursor"] is None
    uploading = client.get("/v1/datasets", params={"status": "uploading"}).json()["items"]
    assert {d["id"] for d in uploading} == set(ids[:3])
    crafted = client.get("/v1/datasets", params={"cursor": "eyJub3QiOiAiYSBjdXJzb3IifQ"})
    assert crafted.status_code == 422 and crafted.json()["detail"][0]["loc"] == ["query", "cursor"]
    assert client.get("/v1/datasets", params={"status": "done"}).status_code == 422
    assert client.get(f"/v1/datasets/{ids[3]}").json()["source"] == "hf://a/b"
    assert client.get(f"/v1/datasets/{uuid.uuid4()}").status_code == 404


def test_the_preview_is_404_until_ready_then_the_verified_file(client: TestClient, settings: Settings) -> None:
    dataset = upload(client, zip_archive()).json()
    r = client.get(f"/v1/datasets/{dataset['id']}/preview.png")
    assert r.status_code == 404 and "preparing" in r.text
    make_ready(settings, dataset["id"])
    shown = client.get(f"/v1/datasets/{dataset['id']}").json()
    assert shown["preview_url"] == f"/v1/datasets/{dataset['id']}/preview.png" and shown["image_count"] == 12
    r = client.get(shown["preview_url"])
    assert r.status_code == 200 and r.content == PNG and r.headers["content-type"] == "image/png"
    assert r.headers["ETag"] == f'"{hashlib.sha256(PNG).hexdigest()}"'
    (settings.checkpoint_root / preview_key(dataset["id"])).write_bytes(b"damaged")
    assert client.get(shown["preview_url"]).status_code == 410


def test_delete_removes_the_row_and_files_but_not_under_a_running_job(client: TestClient, settings: Settings) -> None:
    dataset = upload(client, zip_archive()).json()
    folder = settings.checkpoint_root / "datasets" / dataset["id"]
    make_ready(settings, dataset["id"])
    cache = settings.checkpoint_root / "datasets" / "cache" / ("ab" * 32)
    cache.mkdir(parents=True)
    (cache / "8x8x1.npy").write_bytes(b"npy")
    job = client.post("/v1/jobs", json={"dataset": {"kind": "dataset", "id": dataset["id"]}})
    assert job.status_code == 201, job.text
    busy = client.delete(f"/v1/datasets/{dataset['id']}")
    assert busy.status_code == 409 and job.json()["id"] in busy.json()["detail"]
    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code == 200
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert not folder.exists() and not cache.exists()
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert client.get(f"/v1/jobs/{job.json()['id']}").status_code == 200  # the job stays (dataset_id NULL)


def test_the_cache_stays_while_another_data_set_has_the_same_content(client: TestClient, settings: Settings) -> None:
    first, second = (upload(client, zip_archive()).json() for _ in range(2))
    for d in (first, second):
        make_ready(settings, d["id"])
    cache = settings.checkpoint_root / "datasets" / "cache" / ("ab" * 32)
    cache.mkdir(parents=True)
    (cache / "8x8x1.npy").write_bytes(b"npy")
    assert client.delete(f"/v1/datasets/{first['id']}").status_code == 204
    assert (cache / "8x8x1.npy").exists()
    assert client.delete(f"/v1/datasets/{second['id']}").status_code == 204
    assert not cache.exists()


# --- jobs on a data set ------------------------------------------------------------------------
def _job_on(client: TestClient, dataset_id: str, **headers: str) -> httpx.Response:
    spec = {"dataset": {"kind": "dataset", "id": dataset_id, "image_size": 8, "channels": 1, "image_count": 99999}}
    return client.post("/v1/jobs", json=spec, headers=headers)


def test_a_job_on_a_data_set_that_is_not_ready_or_not_ones_own_is_422_on_dataset_id(
    client: TestClient, settings: Settings, make_user: MakeUser
) -> None:
    preparing = upload(client, zip_archive()).json()
    r = _job_on(client, preparing["id"])
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "dataset", "id"]
    assert "preparing" in r.json()["detail"][0]["msg"]
    assert _job_on(client, str(uuid.uuid4())).json()["detail"][0]["loc"] == ["body", "dataset", "id"]
    make_ready(settings, preparing["id"])
    for other in (make_user("bob"), make_user("root", admin=True)):  # an admin too uses only their own
        theirs = _job_on(client, preparing["id"], **other.headers)
        assert theirs.status_code == 422 and theirs.json()["detail"][0]["loc"] == ["body", "dataset", "id"], theirs.text
    engine = make_engine(settings)
    with session_scope(make_sessionmaker(engine)) as s:
        assert list(s.scalars(select(Job))) == []
    engine.dispose()


def test_a_job_on_a_ready_data_set_records_its_image_count_and_id(client: TestClient, settings: Settings) -> None:
    dataset = upload(client, zip_archive()).json()
    make_ready(settings, dataset["id"], image_count=37)
    r = _job_on(client, dataset["id"].upper())
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["dataset"]["image_count"] == 37
    engine = make_engine(settings)
    with session_scope(make_sessionmaker(engine)) as s:
        job = s.get(Job, uuid.UUID(r.json()["id"]))
        assert job is not None and str(job.dataset_id) == dataset["id"] and job.spec["dataset"]["image_count"] == 37
    engine.dispose()


# --- a real server: disconnects, concurrent PATCHes, trickling clients --------------------------
@pytest.fixture
def live(settings: Settings) -> Iterator[tuple[str, Settings]]:
    settings = settings.model_copy(update={"body_timeout_s": 1.5})
    with api_in_thread(settings) as url:
        yield url, settings


def raw_request(url: str, head: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head.encode())
    return sock


def wait_for(check, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.05)
    pytest.fail("the condition did not hold in time")


def _upload_head(alice: ApiUser, length: int, path: str = "/v1/datasets", method: str = "POST", **headers: str) -> str:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"{method} {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/zip\r\nContent-Length: {length}\r\n"
        f"Authorization: Bearer {alice.key}\r\n{extra}\r\n"
    )


def test_a_client_gone_mid_body_leaves_a_resumable_upload(live, alice: ApiUser) -> None:
    url, settings = live
    data = zip_archive(files=8, size=400_000)
    cut = 1_500_000
    sock = raw_request(url, _upload_head(alice, len(data)))
    sock.sendall(data[:cut])
    time.sleep(0.3)
    sock.close()  # gone, mid-body
    with httpx.Client(base_url=url, headers=alice.headers) as c:
        listed = wait_for(lambda: [d for d in c.get("/v1/datasets").json()["items"] if d["received_bytes"] == cut])
        dataset = listed[0]
        assert dataset["status"] == "uploading"
        part = settings.checkpoint_root / f"datasets/{dataset['id']}/upload.zip"
        assert part.stat().st_size == cut
        row = wait_for(lambda: [d for d in rows(settings) if d.received_bytes == cut])[0]  # the row says so too
        assert (row.status, row.size_bytes) == ("uploading", cut)
        r = c.patch(f"/v1/datasets/{dataset['id']}/upload", content=data[cut:], headers={"Upload-Offset": str(cut)})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "preparing"
        assert (
            r.json()["archive_sha256"]
            == hashlib.sha256(data).hexdigest()
            == hashlib.sha256(part.read_bytes()).hexdigest()
        )


def test_a_second_patch_at_once_is_409(live, alice: ApiUser) -> None:
    url, _ = live
    with httpx.Client(base_url=url, headers=alice.headers) as c:
        dataset = c.post(
            "/v1/datasets", content=b"PK", headers={"Content-Type": "application/zip", "Upload-Complete": "?0"}
        ).json()
        path = f"/v1/datasets/{dataset['id']}/upload"
        sock = raw_request(url, _upload_head(alice, 1000, path, "PATCH", **{"Upload-Offset": "2"}))
        sock.sendall(b"x" * 10)  # the first PATCH holds the upload while its body arrives
        time.sleep(0.5)
        second = c.patch(path, content=b"y", headers={"Upload-Offset": "2"})
        assert second.status_code == 409 and "another request" in second.json()["detail"], second.text
        sock.sendall(b"x" * 990)
        answer = sock.recv(65536)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert (
            c.get(f"/v1/datasets/{dataset['id']}").json()["archive_sha256"]
            == hashlib.sha256(b"PK" + b"x" * 1000).hexdigest()
        )


def test_an_upload_outlasts_the_body_deadline_while_bytes_flow_but_not_a_silence(live, alice: ApiUser) -> None:
    url, settings = live
    chunks = [uuid.uuid4().bytes * 64 for _ in range(8)]
    sock = raw_request(url, _upload_head(alice, sum(map(len, chunks))))
    started = time.monotonic()
    for chunk in chunks:  # 8 chunks 0.5 s apart: 4 s, well past the 1.5 s body deadline
        sock.sendall(chunk)
        time.sleep(0.5)
    answer = sock.recv(65536)
    sock.close()
    assert time.monotonic() - started > 2 * settings.body_timeout_s
    assert answer.startswith(b"HTTP/1.1 201"), answer[:300]

    silent = raw_request(url, _upload_head(alice, 10_000))
    silent.sendall(b"PK" * 100)
    started = time.monotonic()
    silent.settimeout(10)
    answer = silent.recv(65536)
    silent.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < settings.body_timeout_s + 2
    with httpx.Client(base_url=url, headers=alice.headers) as c:
        stalled = wait_for(lambda: [d for d in c.get("/v1/datasets", params={"status": "uploading"}).json()["items"]])
        assert stalled[0]["received_bytes"] == 200  # kept, to resume


def test_a_json_body_keeps_the_whole_body_deadline(live, alice: ApiUser) -> None:
    url, settings = live
    sock = raw_request(url, _upload_head(alice, 40).replace("application/zip", "application/json"))
    started = time.monotonic()
    sock.settimeout(10)
    answer = b""
    for _ in range(6):  # a byte every 0.5 s: an upload would go on, a JSON body is cut off
        try:
            sock.sendall(b" ")
        except OSError:
            break
        time.sleep(0.5)
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < settings.body_timeout_s + 1.5


def test_a_json_body_keeps_the_general_limits(client: TestClient, settings: Settings) -> None:
    big = b'{"source": "hf://a/b", "name": "' + b"x" * settings.max_request_bytes + b'"}'
    r = client.post("/v1/datasets", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_routes_have_no_upload_bytes_left_behind_after_refusals(client: TestClient, settings: Settings) -> None:
    assert client.post("/v1/datasets", content=b"PK", headers={"Content-Type": "text/csv"}).status_code == 415
    assert rows(settings) == []
    assert not [p for p in Path(settings.checkpoint_root).glob("datasets/*/upload.*")]


# --- S3 storage ---------------------------------------------------------------------------------
def test_with_s3_storage_an_upload_lands_in_the_bucket_and_goes_with_the_data_set(
    s3_settings: Settings, alice: ApiUser
) -> None:
    data = zip_archive()
    with TestClient(create_app(s3_settings), headers=alice.headers) as c:
        r = upload(c, data[:100], **{"Upload-Complete": "?0"})  # the part arrives in scratch...
        dataset = r.json()
        key = f"datasets/{dataset['id']}/upload.zip"
        assert (s3_settings.checkpoint_root / key).stat().st_size == 100
        r = c.patch(f"/v1/datasets/{dataset['id']}/upload", content=data[100:], headers={"Upload-Offset": "100"})
        assert r.status_code == 200 and r.json()["status"] == "preparing", r.text
        # ...and once whole it is the bucket's (with its sha256), the scratch copy gone.
        assert f"ckpt/{key}" in bucket_keys(s3_settings)
        stored_object = s3_client(s3_settings).get_object(Bucket=s3_settings.s3_bucket, Key=f"ckpt/{key}")
        assert stored_object["Body"].read() == data
        assert stored_object["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert not (s3_settings.checkpoint_root / key).exists()
        # s3:// sources are this service's to read, but not its own files.
        assert c.post("/v1/datasets", json={"source": "s3://other-bucket/images/"}).status_code == 201
        own = c.post("/v1/datasets", json={"source": f"s3://{s3_settings.s3_bucket}/ckpt/datasets/"})
        assert own.status_code == 422 and "its own files" in own.text
        assert c.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
        assert f"ckpt/{key}" not in bucket_keys(s3_settings)


def test_a_patch_past_the_storage_quota_is_429_and_the_upload_goes(limited: TestClient, settings: Settings) -> None:
    kept = [upload(limited, b"\0" * 9000).json()["id"] for _ in range(2)]  # 18000 of 25000
    second = upload(limited, b"\0" * 5000, **{"Upload-Complete": "?0"}).json()
    url = f"/v1/datasets/{second['id']}/upload"
    more = limited.patch(url, content=b"\0" * 500, headers={"Upload-Offset": "5000", "Upload-Complete": "?0"})
    assert more.status_code == 200, more.text
    over = limited.patch(url, content=iter([b"\0" * 1500, b"\0" * 1500]), headers={"Upload-Offset": "5500"})
    assert over.status_code == 429, over.text
    assert "18000" in over.text and "25000" in over.text  # the others' usage and the quota
    assert sorted(str(d.id) for d in rows(settings)) == sorted(kept)
