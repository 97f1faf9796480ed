"""The `datasets.prepare` task's work (worker/dataset_task.py) against real PostgreSQL: an
uploaded archive (local store and S3) or a source URI becomes a ready data set, or a failed one
with its reason; re-deliveries and deletions mid-way leave no stray rows or files."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import uuid
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from app.checkpoints.store import make_store
from app.config import Settings
from app.datasets.keys import prepared_key, preview_key, upload_key
from app.db import session_scope
from app.models import Dataset, User
from tests.conftest import bucket_keys
from worker import dataset_task
from worker.dataset_task import prepare_dataset
from worker.sweeper import sweep_preparations


def png(shade: int, size: tuple[int, int] = (12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (shade, 80, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def images_zip(count: int, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            archive.writestr(f"set/{i:03d}.png", png(i * 7 % 256))
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def uploaded(settings: Settings, factory: sessionmaker[Session], owner: User, archive: bytes) -> uuid.UUID:
    """A complete upload as the API leaves it: the file in the store, the row `preparing`."""
    dataset_id = uuid.uuid4()
    key = upload_key(dataset_id, "zip")
    path = settings.checkpoint_root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(archive)
    sha256 = hashlib.sha256(archive).hexdigest()
    store = make_store(settings)
    store.publish(path, sha256)
    store.discard_scratch(key)
    with session_scope(factory) as s:
        s.add(
            Dataset(
                id=dataset_id,
                owner_id=owner.id,
                status="preparing",
                source="upload",
                archive_format="zip",
                archive_key=key,
                received_bytes=len(archive),
                archive_sha256=sha256,
                size_bytes=len(archive),
            )
        )
    return dataset_id


def referenced(factory: sessionmaker[Session], owner: User, source: str) -> uuid.UUID:
    with session_scope(factory) as s:
        dataset = Dataset(owner_id=owner.id, status="preparing", source=source)
        s.add(dataset)
        s.flush()
        return dataset.id


def row(factory: sessionmaker[Session], dataset_id: uuid.UUID) -> Dataset | None:
    with session_scope(factory) as s:
        found = s.get(Dataset, dataset_id)
        s.expunge_all()
        return found


def files_of(settings: Settings, dataset_id: uuid.UUID) -> list[str]:
    folder = settings.checkpoint_root / "datasets" / str(dataset_id)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def scratch_left(settings: Settings) -> list[Path]:
    top = settings.checkpoint_root / dataset_task.SCRATCH
    return list(top.iterdir()) if top.is_dir() else []


def test_an_uploaded_zip_becomes_ready_and_the_upload_goes(
    clean_db: Settings, factory: sessionmaker[Session], owner: User
) -> None:
    archive = images_zip(5, {"set/notes.txt": b"hello", "set/tiny.png": png(0, (1, 1))})
    dataset_id = uploaded(clean_db, factory, owner, archive)

    assert prepare_dataset(clean_db, factory, dataset_id) == "ready"

    done = row(factory, dataset_id)
    assert done is not None and done.status == "ready" and done.error is None
    assert (done.image_count, done.skipped) == (5, 2)
    assert done.summary["sizes"] == [{"width": 12, "height": 10, "count": 5}]
    assert done.prepared_key == prepared_key(dataset_id) and done.preview_key == preview_key(dataset_id)
    tar_path = clean_db.checkpoint_root / done.prepared_key
    assert hashlib.sha256(tar_path.read_bytes()).hexdigest() == done.sha256
    assert tar_path.stat().st_size == done.prepared_bytes
    with tarfile.open(tar_path) as tar:
        assert tar.getnames() == [f"{i:08d}.png" for i in range(5)]
    preview = (clean_db.checkpoint_root / done.preview_key).read_bytes()
    assert hashlib.sha256(preview).hexdigest() == done.preview_sha256 and len(preview) == done.preview_bytes
    assert done.size_bytes == done.prepared_bytes + done.preview_bytes  # the quota: no longer the upload
    assert done.archive_key is None and done.prepared_at is not None and done.worker
    assert files_of(clean_db, dataset_id) == ["images.tar", "preview.png"]  # the upload is gone
    assert scratch_left(clean_db) == []

    # A re-delivery (Celery delivers at least once) finds it ready: nothing happens.
    assert prepare_dataset(clean_db, factory, dataset_id) == "skipped"
    again = row(factory, dataset_id)
    assert again is not None
    assert (again.status, again.sha256, again.updated_at) == ("ready", done.sha256, done.updated_at)


def test_a_broken_archive_fails_with_the_reason_and_leaves_the_upload(
    clean_db: Settings, factory: sessionmaker[Session], owner: User
) -> None:
    damaged = uploaded(clean_db, factory, owner, b"this is not a zip file at all" * 10)
    empty = uploaded(clean_db, factory, owner, images_zip(0, {"a.txt": b"x", "b.png": png(0, (2, 2))}))

    assert prepare_dataset(clean_db, factory, damaged) == "failed"
    assert prepare_dataset(clean_db, factory, empty) == "failed"

    for dataset_id, reason in ((damaged, "not a zip, tar or tar.gz"), (empty, "no usable image")):
        failed = row(factory, dataset_id)
        assert failed is not None and failed.status == "failed"
        assert failed.error and reason in failed.error, failed.error
        assert failed.prepared_key is None and failed.sha256 is None
        assert files_of(clean_db, dataset_id) == ["upload.zip"]  # the user's bytes stay until they delete it
    assert scratch_left(clean_db) == []
    assert prepare_dataset(clean_db, factory, damaged) == "skipped"  # failed is final


def test_an_unexpected_error_is_reported_as_internal(
    clean_db: Settings, factory: sessionmaker[Session], owner: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset_id = uploaded(clean_db, factory, owner, images_zip(2))

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(dataset_task, "prepare", broken)
    assert prepare_dataset(clean_db, factory, dataset_id) == "failed"
    failed = row(factory, dataset_id)
    assert failed is not None
    assert failed.error == "internal error while preparing: ZeroDivisionError: division by zero"


def test_a_missing_or_damaged_upload_fails_saying_so(
    clean_db: Settings, factory: sessionmaker[Session], owner: User
) -> None:
    missing = uploaded(clean_db, factory, owner, images_zip(2))
    (clean_db.checkpoint_root / upload_key(missing, "zip")).unlink()
    damaged = uploaded(clean_db, factory, owner, images_zip(2))
    with (clean_db.checkpoint_root / upload_key(damaged, "zip")).open("r+b") as f:
        f.seek(100)
        f.write(b"\xff")  # one byte flipped on disk since it arrived
    assert prepare_dataset(clean_db, factory, missing) == "failed"
    assert prepare_dataset(clean_db, factory, damaged) == "failed"
    failed = row(factory, missing)
    assert failed is not None and failed.error and "upload the archive again" in failed.error
    failed = row(factory, damaged)
    assert failed is not None and failed.error and "the upload is damaged" in failed.error


def test_a_data_set_deleted_while_it_is_prepared_leaves_no_files(
    clean_db: Settings, factory: sessionmaker[Session], owner: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset_id = uploaded(clean_db, factory, owner, images_zip(3))
    real_prepare = dataset_task.prepare

    def deleted_meanwhile(members, out_dir, limits, progress=None):  # type: ignore[no-untyped-def]
        prepared = real_prepare(members, out_dir, limits, progress)
        with session_scope(factory) as s:  # DELETE /v1/datasets/{id} while the worker finishes
            s.delete(s.get(Dataset, dataset_id))
        return prepared

    monkeypatch.setattr(dataset_task, "prepare", deleted_meanwhile)
    assert prepare_dataset(clean_db, factory, dataset_id) == "skipped"
    assert row(factory, dataset_id) is None
    assert not (clean_db.checkpoint_root / "datasets" / str(dataset_id)).exists()
    assert scratch_left(clean_db) == []


def test_an_upload_in_s3_is_prepared_into_the_bucket(
    s3_settings: Settings, factory: sessionmaker[Session], owner: User
) -> None:
    dataset_id = uploaded(s3_settings, factory, owner, images_zip(4))
    prefix = s3_settings.s3_prefix
    assert bucket_keys(s3_settings) == {prefix + upload_key(dataset_id, "zip")}

    assert prepare_dataset(s3_settings, factory, dataset_id) == "ready"

    done = row(factory, dataset_id)
    assert done is not None and done.status == "ready" and done.image_count == 4
    assert bucket_keys(s3_settings) == {prefix + prepared_key(dataset_id), prefix + preview_key(dataset_id)}
    store = make_store(s3_settings)
    assert store.verified_head(done.prepared_key, done.sha256, done.prepared_bytes).size_bytes == done.prepared_bytes
    assert files_of(s3_settings, dataset_id) == []  # no local copy is kept: the bucket holds them
    assert scratch_left(s3_settings) == []


class _Zip(BaseHTTPRequestHandler):
    archive = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.archive)))
        self.end_headers()
        self.wfile.write(self.archive)

    def log_message(self, *args: object) -> None:
        pass


def test_a_source_url_is_downloaded_and_prepared(
    clean_db: Settings, factory: sessionmaker[Session], owner: User
) -> None:
    settings = clean_db.model_copy(update={"dataset_url_allow_private": True})
    handler = type("Handler", (_Zip,), {"archive": images_zip(3)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/set.zip"
        dataset_id = referenced(factory, owner, url)
        refused = referenced(factory, owner, url)
        assert prepare_dataset(settings, factory, dataset_id) == "ready"
        assert prepare_dataset(clean_db, factory, refused) == "failed"  # private addresses not allowed
    finally:
        server.shutdown()
        server.server_close()
    done, failed = row(factory, dataset_id), row(factory, refused)
    assert done is not None and (done.status, done.image_count, done.source) == ("ready", 3, url)
    assert done.size_bytes == done.prepared_bytes + done.preview_bytes
    assert failed is not None and failed.error and "only https:// sources" in failed.error
    assert scratch_left(clean_db) == []  # the download is gone


def test_a_killed_workers_leftovers_go_and_the_sweeper_sends_it_again(
    clean_db: Settings, factory: sessionmaker[Session], owner: User
) -> None:
    dataset_id = uploaded(clean_db, factory, owner, images_zip(3))
    with session_scope(factory) as s:
        s.get(Dataset, dataset_id).worker = "gone-host:1"  # claimed by a worker that then died
    folder = clean_db.checkpoint_root / "datasets" / str(dataset_id)
    (folder / ".images.tar.x1y2.tmp").write_bytes(b"half a tar")
    stale = clean_db.checkpoint_root / dataset_task.SCRATCH / f"{dataset_id}-4242"
    stale.mkdir(parents=True)
    (stale / "download").write_bytes(b"half a download")

    sent: list[str] = []

    class Recorder:
        def send_prepare(self, dataset: str) -> None:
            sent.append(dataset)

    sweep_preparations(clean_db, factory, Recorder())
    freed = row(factory, dataset_id)
    assert freed is not None and (freed.status, freed.worker) == ("preparing", None) and freed.dispatched_at
    assert sent == [str(dataset_id)]
    sweep_preparations(clean_db, factory, Recorder())
    assert sent == [str(dataset_id)]  # just sent: not again until DDPM_RESEND_AFTER_S passes

    assert prepare_dataset(clean_db, factory, dataset_id) == "ready"
    assert files_of(clean_db, dataset_id) == ["images.tar", "preview.png"]
    assert scratch_left(clean_db) == []
