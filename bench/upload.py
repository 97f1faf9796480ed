"""Benchmark: a data set upload (POST /v1/datasets, raw application/zip body) through a real
API server against copying the same file on the same disk.

The API is served in this process (uvicorn on a thread, with app/server.py's protocol) against a
throwaway PostgreSQL database; the client is `curl -T` (it streams the file; httpx in this
process would share the server's interpreter) or, without curl, httpx on a thread. Both sides
write the file once, fsynced: the upload fsyncs its part file before the data set commits, so
the baseline is `shutil.copyfile` + fsync (plain `cp`, which leaves the bytes in the page cache,
is printed too). The upload also hashes every byte (sha256) and records its progress in the
database; the ratio is what all of that costs over a bare copy: MiB/s upload / MiB/s copy.

`python -m bench upload [--short]`: 256 MiB (16 MiB with --short), rounds in alternation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from app.auth.service import create_key
from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope, upgrade_database
from bench.common import REDIS_URL, Rounds, api_in_thread, throwaway_database

MIB = 1 << 20


def random_file(path: Path, size: int) -> str:
    """`size` random bytes at `path`; their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size // MIB):
            block = os.urandom(MIB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def copy_seconds(source: Path, target: Path, fsync: bool) -> float:
    started = time.perf_counter()
    shutil.copyfile(source, target)
    if fsync:
        with target.open("rb+") as f:
            os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def upload_seconds(base: str, key: str, source: Path, sha256: str) -> float:
    """One upload, timed from the first byte sent to the answer; the data set is deleted after."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/zip"}
    started = time.perf_counter()
    if shutil.which("curl"):
        argv = ["curl", "-sS", "--fail-with-body", "-X", "POST", "-T", str(source), f"{base}/v1/datasets"]
        argv += [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
        answer = json.loads(subprocess.run(argv, check=True, capture_output=True).stdout)
    else:

        def blocks() -> Iterator[bytes]:
            with source.open("rb") as f:
                while block := f.read(MIB):
                    yield block

        size = {"Content-Length": str(source.stat().st_size)}
        answer = httpx.post(f"{base}/v1/datasets", content=blocks(), headers=headers | size, timeout=600).json()
    elapsed = time.perf_counter() - started
    if answer.get("archive_sha256") != sha256:
        raise RuntimeError(f"the upload came back with another sha256: {answer}")
    httpx.delete(f"{base}/v1/datasets/{answer['id']}", headers=headers).raise_for_status()
    return elapsed


def run(short: bool = False) -> dict[str, Any]:
    size = (16 if short else 256) * MIB
    rounds = 2 if short else 5
    print(f"== upload: {size // MIB} MiB through POST /v1/datasets vs a copy, {rounds} rounds", flush=True)
    with throwaway_database() as database_url, tempfile.TemporaryDirectory(prefix="ddpm-bench-upload-") as tmp:
        data = Path(tmp)
        settings = Settings(
            database_url=database_url,
            broker_url=REDIS_URL,
            queue=f"ddpm-bench-{uuid.uuid4().hex[:8]}",
            data_dir=data,
            checkpoint_dir=data / "checkpoints",
        )
        upgrade_database(settings)
        engine = make_engine(settings)
        with session_scope(make_sessionmaker(engine)) as s:
            key = create_key(s, settings.secret_key, "bench").key
        engine.dispose()
        source = data / "source.zip"
        sha256 = random_file(source, size)
        target = data / "copy.zip"
        with api_in_thread(settings) as base:
            samples = Rounds().run(
                rounds,
                {
                    "upload": lambda: size / MIB / upload_seconds(base, key, source, sha256),
                    "copy+fsync": lambda: size / MIB / copy_seconds(source, target, fsync=True),
                    "cp": lambda: size / MIB / copy_seconds(source, target, fsync=False),
                },
            )
    results = {
        "bytes": size,
        "client": "curl" if shutil.which("curl") else "httpx",
        "mib_per_s": {name: samples.median(name) for name in samples.samples},
        "ratio": samples.ratio("upload", "copy+fsync"),
        "ratio_vs_cp": samples.ratio("upload", "cp"),
    }
    print(samples.report("MiB/s"))
    print(f"ratio upload / copy+fsync: {results['ratio']:.3f}  (upload / cp: {results['ratio_vs_cp']:.3f})")
    print(f"JSON {json.dumps(results)}", flush=True)
    return results


if __name__ == "__main__":
    run(short=False)
