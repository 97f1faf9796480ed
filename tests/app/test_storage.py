"""Checkpoint storage in an S3-compatible bucket: the store against a real S3 server (moto on
loopback, real boto3 over real connections), and the API serving files from it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.checkpoints.store import CheckpointFileError, LocalStore, S3Store, StorageUnavailable, make_store
from app.client import DdpmClient
from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import Checkpoint
from tests.conftest import MakeUser, bucket_keys, s3_client


def scratch_file(settings: Settings, key: str, data: bytes) -> Path:
    path = settings.checkpoint_root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def store(s3_settings: Settings) -> S3Store:
    made = make_store(s3_settings)
    assert isinstance(made, S3Store)
    return made


class TestSettings:
    def test_local_is_the_default_and_s3_needs_a_bucket(self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert Settings().storage == "local"
        assert isinstance(make_store(Settings()), LocalStore)
        monkeypatch.setenv("DDPM_STORAGE", "s3")
        with pytest.raises(ValueError, match="DDPM_S3_BUCKET"):
            Settings()
        monkeypatch.setenv("DDPM_S3_BUCKET", "checkpoints")
        monkeypatch.setenv("DDPM_S3_SECRET_ACCESS_KEY", "hunter2")
        settings = Settings()
        assert (settings.storage, settings.s3_download, settings.s3_multipart_threshold_mb) == ("s3", "stream", 64)
        assert "hunter2" not in repr(settings)


class TestS3Store:
    def test_publish_list_discard_delete(self, store: S3Store, s3_settings: Settings) -> None:
        key = "job-1/attempt-1/step-00000010.safetensors"
        path = scratch_file(s3_settings, key, b"weights")
        assert store.publish(path) == key
        head = s3_client(s3_settings).head_object(Bucket=s3_settings.s3_bucket, Key=f"ckpt/{key}")
        assert head["Metadata"] == {"sha256": hashlib.sha256(b"weights").hexdigest()}
        assert head["ContentLength"] == 7
        scratch_file(s3_settings, "job-1/attempt-2/.step-00000020.safetensors.x.tmp", b"torn")  # never uploaded
        assert store.keys_under("job-1/") == {key, "job-1/attempt-2/.step-00000020.safetensors.x.tmp"}
        assert store.keys_under("job-2/") == set()

        store.discard_scratch(key)
        assert not path.exists()
        assert store.keys_under("job-1/attempt-1/") == {key}  # the bucket still has it
        store.delete(key)
        store.delete("job-1/attempt-2/.step-00000020.safetensors.x.tmp")
        assert store.keys_under("job-1/") == set()
        assert bucket_keys(s3_settings) == set()
        store.delete(key)  # deleting twice is fine

    def test_a_file_above_the_threshold_uploads_in_parts_and_lands_whole(self, s3_settings: Settings) -> None:
        store = make_store(s3_settings.model_copy(update={"s3_multipart_threshold_mb": 1}))
        data = os.urandom(9 * 1024 * 1024)  # two parts: 8 MiB and 1 MiB
        sha = hashlib.sha256(data).hexdigest()
        key = store.publish(scratch_file(s3_settings, "job/attempt-1/big.safetensors", data), sha)
        head = s3_client(s3_settings).head_object(Bucket=s3_settings.s3_bucket, Key=f"ckpt/{key}")
        assert head["ETag"].endswith('-2"'), head["ETag"]  # a multipart object's ETag counts its parts
        assert (head["ContentLength"], head["Metadata"]["sha256"]) == (len(data), sha)
        with store.local_copy(key, sha, len(data)) as copy:
            assert hashlib.sha256(copy.read_bytes()).hexdigest() == sha
        assert not copy.exists(), "the temporary copy goes after the block"

    def test_local_copy_refuses_a_missing_or_damaged_object(self, store: S3Store, s3_settings: Settings) -> None:
        key = store.publish(scratch_file(s3_settings, "job/a.safetensors", b"0123456789"))
        sha = hashlib.sha256(b"0123456789").hexdigest()
        with pytest.raises(CheckpointFileError, match="bytes stored, 11 recorded"):
            store.local_copy(key, sha, 11).__enter__()
        with pytest.raises(CheckpointFileError, match="sha256"):
            store.local_copy(key, "0" * 64, 10).__enter__()
        # Same size, same metadata, other bytes: caught once the download is hashed.
        s3_client(s3_settings).put_object(
            Bucket=s3_settings.s3_bucket, Key=f"ckpt/{key}", Body=b"0123456780", Metadata={"sha256": sha}
        )
        with pytest.raises(CheckpointFileError, match="do not match"):
            store.local_copy(key, sha, 10).__enter__()
        store.delete(key)
        with pytest.raises(CheckpointFileError, match="missing"):
            store.local_copy(key, sha, 10).__enter__()

    def test_resume_copy_downloads_into_the_scratch_root(self, store: S3Store, s3_settings: Settings) -> None:
        key = "job/attempt-1/step-00000010.state.safetensors"
        path = scratch_file(s3_settings, key, b"state")
        store.publish(path)
        store.discard_scratch(key)
        assert store.resume_copy(key) == path
        assert path.read_bytes() == b"state"
        path.write_bytes(b"stale")  # a damaged local copy is replaced, not trusted
        assert store.resume_copy(key).read_bytes() == b"state"


# --- the API serving from S3 -------------------------------------------------------------


@pytest.fixture
def s3_client_for(s3_settings: Settings, make_user: MakeUser) -> Iterator[TestClient]:
    with TestClient(create_app(s3_settings), headers=make_user("alice").headers) as client:
        yield client


def add_checkpoint(settings: Settings, job_id: str, step: int, payload: bytes) -> str:
    """Stored through the store (as a worker does), then its row."""
    key = f"{job_id}/attempt-1/step-{step:08d}.safetensors"
    store = make_store(settings)
    store.publish(scratch_file(settings, key, payload))
    store.discard_scratch(key)
    with session_scope(make_sessionmaker(make_engine(settings))) as s:
        s.add(
            Checkpoint(
                job_id=uuid.UUID(job_id),
                step=step,
                path=key,
                size_bytes=len(payload),
                sha256=hashlib.sha256(payload).hexdigest(),
                state_path=key.replace(".safetensors", ".state.safetensors"),
            )
        )
    return key


PAYLOAD = bytes(range(256)) * 40


class TestS3Downloads:
    def test_whole_download_streams_with_the_sha256_headers(
        self, s3_client_for: TestClient, s3_settings: Settings
    ) -> None:
        job_id = s3_client_for.post("/v1/jobs", json={}).json()["id"]
        add_checkpoint(s3_settings, job_id, 10, PAYLOAD)
        r = s3_client_for.get(f"/v1/jobs/{job_id}/checkpoints/latest")
        sha = hashlib.sha256(PAYLOAD).hexdigest()
        assert r.status_code == 200
        assert r.content == PAYLOAD
        assert r.headers["etag"] == f'"{sha}"'
        assert r.headers["x-checksum-sha256"] == sha
        assert r.headers["content-length"] == str(len(PAYLOAD))
        assert r.headers["accept-ranges"] == "bytes"
        assert r.headers["content-disposition"] == f'attachment; filename="{job_id}-step-00000010.safetensors"'
        assert not (s3_settings.checkpoint_root / job_id).exists() or not any(
            (s3_settings.checkpoint_root / job_id).rglob("*.safetensors")
        ), "served from the bucket, not from a local file"

    def test_range_requests_are_206_and_416_outside(self, s3_client_for: TestClient, s3_settings: Settings) -> None:
        job_id = s3_client_for.post("/v1/jobs", json={}).json()["id"]
        add_checkpoint(s3_settings, job_id, 10, PAYLOAD)
        url, size = f"/v1/jobs/{job_id}/checkpoints/10", len(PAYLOAD)
        for header, (start, end) in {
            "bytes=100-199": (100, 199),
            "bytes=10000-": (10000, size - 1),
            "bytes=-5": (size - 5, size - 1),
            f"bytes=10-{size + 50}": (10, size - 1),
        }.items():
            r = s3_client_for.get(url, headers={"Range": header})
            assert r.status_code == 206, (header, r.text)
            assert r.content == PAYLOAD[start : end + 1]
            assert r.headers["content-range"] == f"bytes {start}-{end}/{size}"
            assert r.headers["content-length"] == str(end - start + 1)
            assert r.headers["x-checksum-sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
        r = s3_client_for.get(url, headers={"Range": f"bytes={size}-"})
        assert r.status_code == 416
        assert r.headers["content-range"] == f"bytes */{size}"
        assert s3_client_for.get(url, headers={"Range": "bytes=0-1,5-6"}).content == PAYLOAD  # not honoured: all

    def test_a_missing_or_damaged_object_is_410(self, s3_client_for: TestClient, s3_settings: Settings) -> None:
        job_id = s3_client_for.post("/v1/jobs", json={}).json()["id"]
        key = add_checkpoint(s3_settings, job_id, 10, b"0123456789")
        bucket, s3 = s3_settings.s3_bucket, s3_client(s3_settings)
        s3.put_object(Bucket=bucket, Key=f"ckpt/{key}", Body=b"0123456789", Metadata={"sha256": "0" * 64})
        r = s3_client_for.get(f"/v1/jobs/{job_id}/checkpoints/10")
        assert r.status_code == 410 and "sha256" in r.json()["detail"]
        s3.put_object(Bucket=bucket, Key=f"ckpt/{key}", Body=b"012345678")
        r = s3_client_for.get(f"/v1/jobs/{job_id}/checkpoints/10")
        assert r.status_code == 410 and "9 bytes stored, 10 recorded" in r.json()["detail"]
        s3.delete_object(Bucket=bucket, Key=f"ckpt/{key}")
        r = s3_client_for.get(f"/v1/jobs/{job_id}/checkpoints/latest")
        assert r.status_code == 410 and "missing" in r.json()["detail"]
        assert s3_client_for.get(f"/v1/jobs/{job_id}/checkpoints/10/export").status_code == 410

    def test_bytes_that_do_not_hash_to_the_record_are_never_sent_whole(
        self, s3_client_for: TestClient, s3_settings: Settings
    ) -> None:
        job_id = s3_client_for.post("/v1/jobs", json={}).json()["id"]
        key = add_checkpoint(s3_settings, job_id, 10, b"0123456789")
        sha = hashlib.sha256(b"0123456789").hexdigest()
        # Same size and metadata, other bytes: the HEAD check passes, the stream's own hash does not.
        s3_client(s3_settings).put_object(
            Bucket=s3_settings.s3_bucket, Key=f"ckpt/{key}", Body=b"0123456780", Metadata={"sha256": sha}
        )
        with pytest.raises(CheckpointFileError, match="do not match"):
            s3_client_for.get(f"/v1/jobs/{job_id}/checkpoints/10")

    def test_redirect_mode_sends_a_presigned_url(
        self, s3_settings: Settings, make_user: MakeUser, tmp_path: Path
    ) -> None:
        settings = s3_settings.model_copy(update={"s3_download": "redirect"})
        user = make_user("alice")
        with TestClient(create_app(settings), headers=user.headers) as client:
            job_id = client.post("/v1/jobs", json={}).json()["id"]
            add_checkpoint(settings, job_id, 10, PAYLOAD)
            r = client.get(f"/v1/jobs/{job_id}/checkpoints/10", follow_redirects=False)
            assert r.status_code == 307
            location = r.headers["location"]
            assert location.startswith(f"{settings.s3_endpoint_url}/{settings.s3_bucket}/ckpt/{job_id}/")
            fetched = httpx.get(location)  # from the S3 server itself, no API key
            assert fetched.status_code == 200
            assert fetched.content == PAYLOAD
            assert fetched.headers["content-disposition"] == (
                f'attachment; filename="{job_id}-step-00000010.safetensors"'
            )
            assert fetched.headers["content-type"] == "application/octet-stream"
            assert httpx.get(location, headers={"Range": "bytes=0-9"}).content == PAYLOAD[:10]
            # The client follows it, without sending the API key to S3, and checks the listed sha256.
            sent_to_s3: list[str | None] = []

            class ApiThenNetwork(httpx.BaseTransport):
                network = httpx.HTTPTransport()

                def handle_request(self, request: httpx.Request) -> httpx.Response:
                    if request.url.host == "testserver":
                        answer = client.request(request.method, request.url.raw_path.decode(), follow_redirects=False)
                        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)
                    sent_to_s3.append(request.headers.get("authorization"))
                    return self.network.handle_request(request)

            with DdpmClient("http://testserver", user.key, transport=ApiThenNetwork()) as ddpm:
                saved = ddpm.download(job_id, tmp_path)
            assert saved == tmp_path / f"{job_id}-step-00000010.safetensors" and saved.read_bytes() == PAYLOAD
            assert sent_to_s3 == [None]
            # A damaged object is still a 410, not a redirect.
            s3_client(settings).delete_object(
                Bucket=settings.s3_bucket, Key=f"ckpt/{job_id}/attempt-1/step-00000010.safetensors"
            )
            assert client.get(f"/v1/jobs/{job_id}/checkpoints/10", follow_redirects=False).status_code == 410

    def test_export_zips_a_verified_copy_of_the_object(self, s3_client_for: TestClient, s3_settings: Settings) -> None:
        job_id = s3_client_for.post("/v1/jobs", json={}).json()["id"]
        header = json.dumps({"__metadata__": {"unet_config": json.dumps({"sample_size": 8})}}).encode()
        weights = len(header).to_bytes(8, "little") + header  # a safetensors file with no tensors
        add_checkpoint(s3_settings, job_id, 10, weights)
        r = s3_client_for.get(f"/v1/jobs/{job_id}/checkpoints/10/export")
        assert r.status_code == 200, r.text
        with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
            assert archive.read("unet/diffusion_pytorch_model.safetensors") == weights
            assert json.loads(archive.read("unet/config.json"))["sample_size"] == 8
        add_checkpoint(s3_settings, job_id, 20, b"not a safetensors file")
        r = s3_client_for.get(f"/v1/jobs/{job_id}/checkpoints/20/export")
        assert r.status_code == 410 and "safetensors" in r.json()["detail"]


class TestS3Away:
    def test_an_unreachable_endpoint_is_storage_unavailable_and_a_503(
        self, s3_settings: Settings, make_user: MakeUser
    ) -> None:
        with socket.socket() as s:  # a loopback port with nothing listening
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        settings = s3_settings.model_copy(update={"s3_endpoint_url": dead})
        store = make_store(settings)
        with pytest.raises(StorageUnavailable, match="S3 unavailable"):
            store.publish(scratch_file(settings, "job/a.safetensors", b"x"))
        with pytest.raises(StorageUnavailable):
            store.keys_under("job/")
        with TestClient(create_app(settings), headers=make_user("alice").headers) as client:
            job_id = client.post("/v1/jobs", json={}).json()["id"]
            with session_scope(make_sessionmaker(make_engine(settings))) as s:
                s.add(
                    Checkpoint(
                        job_id=uuid.UUID(job_id),
                        step=1,
                        path=f"{job_id}/a",
                        size_bytes=1,
                        sha256="0" * 64,
                        state_path=f"{job_id}/a.state",
                    )
                )
            r = client.get(f"/v1/jobs/{job_id}/checkpoints/1")
            assert r.status_code == 503 and "S3 unavailable" in r.json()["detail"]
