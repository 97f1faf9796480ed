"""`ddpm datasets ...` and `ddpm submit --dataset`: the folder's tar (deterministic, resumable from
any offset, symlinks out refused), then against the real API process: an archive and a folder
uploaded with the stored sha256 equal to the bytes sent, an upload resumed after a proxy cut the
connection, list/show/delete and their --json; against mock transports: --wait's summary, preview."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import socket
import tarfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.client import DdpmClient
from app.client.archive import ArchiveError, ArchiveFile, FolderTar
from app.client.cli import on_dataset
from tests.client.conftest import RunningApi
from tests.client.test_cli import assert_clean_error, ddpm, use_transport


def png(seed: int, size: int = 16) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three images in two folders, a name longer than a tar header holds, and a symlink inside."""
    root = tmp_path / "images"
    (root / "cats" / "small").mkdir(parents=True)
    (root / "b.png").write_bytes(png(1))
    (root / "cats" / "a.png").write_bytes(png(2))
    (root / "cats" / "small" / ("long-" * 30 + ".png")).write_bytes(png(3))
    (root / "again.png").symlink_to("b.png")
    (root / "loop").symlink_to("cats", target_is_directory=True)
    return root


def tar_bytes(root: Path) -> bytes:
    return b"".join(FolderTar(root).chunks())


class TestFolderTar:
    def test_the_same_bytes_from_a_copy_with_other_times_and_modes(self, folder: Path, tmp_path: Path) -> None:
        first = tar_bytes(folder)
        assert tar_bytes(folder) == first
        copy = tmp_path / "copy" / "images"
        shutil.copytree(folder, copy, symlinks=True)
        for path in copy.rglob("*.png"):
            if not path.is_symlink():
                os.utime(path, (1e9, 1e9))
                path.chmod(0o600)
        assert tar_bytes(copy) == first

    def test_members_sorted_regular_files_no_owner_no_time(self, folder: Path) -> None:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes(folder))) as archive:
            members = archive.getmembers()
            names = [m.name for m in members]
            assert names == ["again.png", "b.png", "cats/a.png", "cats/small/" + "long-" * 30 + ".png"]
            assert {(m.type, m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {
                (tarfile.REGTYPE, 0, 0o644, 0, 0, "", "")
            }
            assert archive.extractfile("again.png").read() == png(1)  # a symlink inside: its file

    def test_any_window_is_the_same_slice(self, folder: Path) -> None:
        source = FolderTar(folder)
        whole = b"".join(source.chunks())
        assert len(whole) == source.size
        rng = random.Random(0)
        cuts = [0, 511, 512, 513, source.size - 1024, source.size - 1, source.size]
        cuts += [rng.randrange(source.size + 1) for _ in range(40)]
        for start in cuts:
            stop = rng.randrange(start, source.size + 1)
            assert b"".join(source.chunks(start)) == whole[start:]
            assert b"".join(source.chunks(start, stop)) == whole[start:stop]

    def test_a_symlink_out_of_the_folder_is_refused(self, folder: Path, tmp_path: Path) -> None:
        (tmp_path / "secret.txt").write_text("not yours")
        (folder / "cats" / "escape.png").symlink_to(tmp_path / "secret.txt")
        with pytest.raises(ArchiveError, match=r"cats/escape.png is a symlink to .*secret.txt, outside"):
            FolderTar(folder)

    def test_an_empty_folder_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        assert_clean_error(ddpm(None, "k", "datasets", "upload", str(tmp_path / "empty")), "holds no files to send")

    def test_a_pipe_is_left_out(self, folder: Path) -> None:
        os.mkfifo(folder / "pipe")
        source = FolderTar(folder)
        assert source.left_out == ["pipe"] and "pipe" not in [m.arcname for m in source.members]


class TestArchiveFile:
    def test_content_type_from_the_bytes_not_the_name(self, tmp_path: Path) -> None:
        zipped = tmp_path / "images.tar.gz"  # misnamed: it is a zip
        with zipfile.ZipFile(zipped, "w") as archive:
            archive.writestr("a.png", png(1))
        assert ArchiveFile(zipped).content_type == "application/zip"
        tarred = tmp_path / "images.bin"
        tarred.write_bytes(tar_bytes_of({"a.png": png(1)}))
        assert ArchiveFile(tarred).content_type == "application/x-tar"
        gzipped = tmp_path / "cats.tar.gz"
        gzipped.write_bytes(gzip.compress(tar_bytes_of({"a.png": png(1)})))
        assert (ArchiveFile(gzipped).content_type, ArchiveFile(gzipped).name) == ("application/gzip", "cats")

    def test_not_an_archive_is_a_clean_error(self, tmp_path: Path) -> None:
        (tmp_path / "notes.zip").write_text("hello")
        result = ddpm(None, "k", "datasets", "upload", str(tmp_path / "notes.zip"))
        assert_clean_error(result, "notes.zip is not a zip, tar or tar.gz archive")
        assert_clean_error(ddpm(None, "k", "datasets", "upload", str(tmp_path / "nope")), "nope does not exist")


def tar_bytes_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_of_images(path: Path, noise_bytes: int = 0) -> Path:
    """A zip of three PNGs; `noise_bytes` of random data stored beside them makes it that much bigger."""
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(3):
            archive.writestr(f"img/{i}.png", png(i))
        if noise_bytes:
            archive.writestr("noise.bin", random.Random(1).randbytes(noise_bytes), zipfile.ZIP_STORED)
    return path


class CuttingProxy:
    """A TCP proxy in front of the API that, once, closes the connection after `cut_after` bytes
    have gone from the client to the server (on whichever connection carries them)."""

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port, self.cut_after = upstream_port, cut_after
        self.forwarded, self.cuts = 0, 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if upstream:
                    with self.lock:
                        if self.cuts == 0 and self.forwarded + len(data) > self.cut_after:
                            sink.sendall(data[: self.cut_after - self.forwarded])
                            self.forwarded, self.cuts = self.cut_after, 1
                            raise OSError("cut")
                        self.forwarded += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.e2e
class TestAgainstTheApi:
    @pytest.fixture
    def key(self, new_key: Callable[[], str]) -> str:
        return new_key()

    def test_upload_a_zip_and_a_folder(self, api: RunningApi, key: str, folder: Path, tmp_path: Path) -> None:
        archive = zip_of_images(tmp_path / "three.zip")
        uploaded = ddpm(api, key, "datasets", "upload", str(archive), "--name", "three")
        assert uploaded.exit_code == 0, uploaded.output
        assert "sha256 verified" in uploaded.stderr
        size_mb = archive.stat().st_size / 1e6
        assert f"upload {archive}: {size_mb:,.1f}/{size_mb:,.1f} MB (100%)" in uploaded.stderr  # not a TTY: lines
        from_folder = ddpm(api, key, "datasets", "upload", str(folder))
        assert from_folder.exit_code == 0, from_folder.output
        with DdpmClient(api.base, key) as client:
            zipped = client.get_dataset(uploaded.stdout.strip())
            tarred = client.get_dataset(from_folder.stdout.strip())
        sent = tar_bytes(folder)
        assert sent == tar_bytes(folder)  # made again: the same bytes
        assert (zipped["name"], zipped["format"], zipped["status"]) == ("three", "zip", "preparing")
        assert zipped["archive_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
        assert zipped["received_bytes"] == archive.stat().st_size
        assert (tarred["name"], tarred["format"], tarred["status"]) == ("images", "tar", "preparing")
        assert tarred["archive_sha256"] == hashlib.sha256(sent).hexdigest()

    def test_a_dropped_connection_resumes_where_the_server_got_to(
        self, api: RunningApi, key: str, tmp_path: Path
    ) -> None:
        archive = zip_of_images(tmp_path / "big.zip", noise_bytes=600_000)
        proxy = CuttingProxy(int(api.base.rsplit(":", 1)[1]), cut_after=200_000)
        seen: list[int] = []
        try:
            with DdpmClient(f"http://127.0.0.1:{proxy.port}", key) as client:
                dataset = client.upload_dataset(archive, progress=lambda done, _: seen.append(done), retry_delay=0.2)
        finally:
            proxy.close()
        assert proxy.cuts == 1
        restarts = [later for earlier, later in itertools.pairwise(seen) if later < earlier]
        assert restarts and all(0 < r < 200_000 for r in restarts), restarts  # from the server's offset, not 0
        assert dataset["status"] == "preparing"
        assert dataset["archive_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
        assert dataset["received_bytes"] == archive.stat().st_size

    def test_upload_resume_goes_on_with_a_broken_off_upload(
        self, api: RunningApi, key: str, folder: Path, tmp_path: Path
    ) -> None:
        sent = tar_bytes(folder)
        headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/x-tar",
            "Upload-Length": str(len(sent)),
            "Upload-Complete": "?0",
        }
        started = httpx.post(f"{api.base}/v1/datasets", content=sent[:1500], headers=headers, timeout=30)
        assert started.status_code == 201, started.text
        dataset_id = started.json()["id"]
        other = zip_of_images(tmp_path / "other.zip")
        wrong = ddpm(api, key, "datasets", "upload", str(other), "--resume", dataset_id)
        assert_clean_error(wrong, "not the same files")
        resumed = ddpm(api, key, "datasets", "upload", str(folder), "--resume", dataset_id)
        assert resumed.exit_code == 0, resumed.output
        assert resumed.stdout.strip() == dataset_id
        with DdpmClient(api.base, key) as client:
            dataset = client.get_dataset(dataset_id)
        assert dataset["archive_sha256"] == hashlib.sha256(sent).hexdigest() and dataset["status"] == "preparing"

    def test_list_show_delete_and_json(self, api: RunningApi, key: str, tmp_path: Path) -> None:
        with DdpmClient(api.base, key) as client:
            made = [client.upload_dataset(zip_of_images(tmp_path / f"{n}.zip"), name=n) for n in ("one", "two")]
        listed = ddpm(api, key, "datasets", "list")
        assert listed.exit_code == 0, listed.output
        lines = listed.stdout.splitlines()
        assert lines[0].split() == ["id", "name", "status", "images", "skipped", "size", "created"]
        assert [line.split()[:3] for line in lines[1:]] == [[d["id"], d["name"], "preparing"] for d in made[::-1]]
        as_json = json.loads(ddpm(api, key, "datasets", "list", "--json").stdout)
        assert [d["id"] for d in as_json] == [d["id"] for d in made[::-1]]
        shown = ddpm(api, key, "datasets", "show", made[0]["id"])
        assert shown.exit_code == 0 and "preparing" in shown.stdout and "upload (zip)" in shown.stdout
        assert json.loads(ddpm(api, key, "datasets", "show", made[0]["id"], "--json").stdout)["id"] == made[0]["id"]

        deleted = ddpm(api, key, "datasets", "delete", made[0]["id"])
        assert deleted.exit_code == 0 and f"data set {made[0]['id']} deleted" in deleted.stdout
        assert_clean_error(ddpm(api, key, "datasets", "show", made[0]["id"]), "error (404)")
        assert_clean_error(ddpm(api, key, "datasets", "preview", made[1]["id"]), "error (404)")  # not ready
        assert [d["id"] for d in json.loads(ddpm(api, key, "datasets", "list", "--json").stdout)] == [made[1]["id"]]

    def test_submit_on_a_data_set_not_ready_is_the_servers_422(self, api: RunningApi, key: str, tmp_path: Path) -> None:
        with DdpmClient(api.base, key) as client:
            dataset = client.upload_dataset(zip_of_images(tmp_path / "x.zip"))
        result = ddpm(api, key, "submit", "--dataset", dataset["id"])
        assert_clean_error(result, "error (422)", "dataset.id")


class TestSubmitDataset:
    def test_sets_kind_and_id_and_keeps_size_channels_flip(self, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
        bodies: list[dict] = []

        def handler(request: httpx.Request) -> httpx.Response:
            bodies.append(json.loads(request.content))
            return httpx.Response(201, json={"id": "j1", "status": "queued", "total_steps": 10})

        use_transport(monkeypatch, handler)
        spec = tmp_path / "spec.yaml"
        spec.write_text("dataset:\n  kind: folder\n  path: /data/x\n  image_size: 32\n  channels: 3\n")
        assert ddpm(None, "k", "submit", str(spec), "--dataset", "d1").exit_code == 0
        assert ddpm(None, "k", "submit", "--dataset", "d2").exit_code == 0
        assert bodies == [
            {"dataset": {"kind": "dataset", "id": "d1", "image_size": 32, "channels": 3}},
            {"dataset": {"kind": "dataset", "id": "d2"}},
        ]
        kept = on_dataset({"random_flip": True, "id": "old"}, "d3")
        assert kept == {"kind": "dataset", "id": "d3", "random_flip": True}


READY = {
    "id": "d1",
    "name": "cats",
    "status": "ready",
    "source": "upload",
    "split": None,
    "format": "zip",
    "received_bytes": 1000,
    "upload_length": 1000,
    "size_bytes": 2_500_000,
    "archive_sha256": "ab" * 32,
    "sha256": "cd" * 32,
    "image_count": 1200,
    "skipped": 3,
    "summary": {
        "sizes": [{"width": 32, "height": 32, "count": 1150}, {"width": 64, "height": 48, "count": 50}],
        "modes": {"RGB": 1190, "L": 10},
        "skipped_reasons": {"not an image": 2, "too small": 1},
        "skipped_examples": [{"name": "notes.txt", "reason": "not an image"}],
        "source_bytes": 1000,
        "seconds": 1.5,
    },
    "error": None,
    "preview_url": "/v1/datasets/d1/preview.png",
    "created_at": "2026-11-30T08:00:00+00:00",
    "updated_at": "2026-11-30T08:01:00+00:00",
    "prepared_at": "2026-11-30T08:01:00+00:00",
}


class TestWaitAndPreview:
    def serve(self, monkeypatch: pytest.MonkeyPatch, final: dict) -> list[str]:
        seen: list[str] = []
        polls = iter([{**READY, "status": "preparing", "image_count": None}, final])
        grid = b"\x89PNG preview"

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(f"{request.method} {request.url.path}")
            if request.method == "POST":
                return httpx.Response(201, json={**READY, "status": "preparing"})
            if request.url.path.endswith("preview.png"):
                sha = hashlib.sha256(grid).hexdigest()
                return httpx.Response(200, content=grid, headers={"ETag": f'"{sha}"', "Content-Type": "image/png"})
            return httpx.Response(200, json=next(polls, final))

        use_transport(monkeypatch, handler)
        return seen

    def test_add_wait_prints_the_summary(self, monkeypatch: pytest.MonkeyPatch) -> None:
        seen = self.serve(monkeypatch, READY)
        result = ddpm(None, "k", "datasets", "add", "hf://ns/cats", "--wait")
        assert result.exit_code == 0, result.output
        text = " ".join(result.stdout.split())
        for fragment in ("d1", "ready", "1,200", "skipped 3 (2 not an image, 1 too small)", "notes.txt: not an image"):
            assert fragment in text, text
        assert "32x32 (1,150), 64x48 (50)" in text and "RGB (1,190), L (10)" in text
        assert seen == ["POST /v1/datasets", "GET /v1/datasets/d1", "GET /v1/datasets/d1"]

    def test_a_failed_preparation_exits_1_with_the_reason(self, monkeypatch: pytest.MonkeyPatch) -> None:
        failed = {**READY, "status": "failed", "image_count": None, "error": "no usable image: 3 files skipped"}
        self.serve(monkeypatch, failed)
        result = ddpm(None, "k", "datasets", "add", "https://example.org/x.zip", "--wait")
        assert result.exit_code == 1 and "no usable image: 3 files skipped" in " ".join(result.stdout.split())

    def test_preview_into_a_file(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.serve(monkeypatch, READY)
        result = ddpm(None, "k", "datasets", "preview", "d1", "--out", str(tmp_path / "cats.png"))
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == str(tmp_path / "cats.png")
        assert (tmp_path / "cats.png").read_bytes() == b"\x89PNG preview"
