"""Crash-safe writes (ARCHITECTURE.md invariant 3) and file checksums."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from app import files
from app.files import atomic_file, atomic_write, sha256_file


class TestAtomicWrite:
    def test_writes_and_returns_sha256(self, tmp_path: Path) -> None:
        target = tmp_path / "f.bin"
        digest = atomic_write(target, b"hello")
        assert target.read_bytes() == b"hello"
        assert digest == hashlib.sha256(b"hello").hexdigest() == sha256_file(target)
        assert os.listdir(tmp_path) == ["f.bin"]

    def test_crash_before_rename_keeps_old_file_and_no_temp(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        target = tmp_path / "f.bin"
        atomic_write(target, b"old")

        def crash(*args: object) -> None:
            raise OSError("disk on fire")

        monkeypatch.setattr(files.os, "replace", crash)
        with pytest.raises(OSError, match="disk on fire"):
            atomic_write(target, b"new" * 1000)
        assert target.read_bytes() == b"old"
        assert os.listdir(tmp_path) == ["f.bin"]

    def test_crash_during_write_leaves_no_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        def crash(fd: int) -> None:
            raise OSError("fsync failed")

        monkeypatch.setattr(files.os, "fsync", crash)
        with pytest.raises(OSError, match="fsync failed"):
            atomic_write(tmp_path / "f.bin", b"data")
        assert os.listdir(tmp_path) == []


class TestAtomicFile:
    def test_an_error_in_the_block_keeps_the_old_file_and_no_temp(self, tmp_path: Path) -> None:
        target = tmp_path / "f.bin"
        atomic_write(target, b"old")
        with pytest.raises(ValueError, match="checksum"), atomic_file(target, suffix=".part") as out:
            out.write(b"new")
            raise ValueError("checksum does not match")
        assert target.read_bytes() == b"old"
        assert os.listdir(tmp_path) == ["f.bin"]

    def test_the_file_is_synced_before_the_rename_and_the_directory_after(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls: list[str] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            calls.append("fsync directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
            real_fsync(fd)

        def replace(src: str, dst: str | Path) -> None:
            calls.append("rename")
            real_replace(src, dst)

        monkeypatch.setattr(files.os, "fsync", fsync)
        monkeypatch.setattr(files.os, "replace", replace)
        with atomic_file(tmp_path / "f.bin") as out:
            out.write(b"data")
        assert calls == ["fsync file", "rename", "fsync directory"]
        assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


class TestSha256File:
    def test_reads_in_chunks(self, tmp_path: Path) -> None:
        data = os.urandom(3 * 1024 + 5)
        (tmp_path / "f.bin").write_bytes(data)
        assert sha256_file(tmp_path / "f.bin", chunk_size=1024) == hashlib.sha256(data).hexdigest()
