"""Benchmark: how fast a worker prepares an uploaded data set (worker/datasets/prepare.py).

A generated archive of small RGB PNGs (5,000 of 32x32, or 200 with --short; random pixels, so
they do not compress away) in each format, prepared from the archive on disk to images.tar +
preview.png as the worker does: sniffing, reading every member in memory, decoding it with the
pixel and size checks, the spool, the sorted deterministic tar. Prints images/s per format, and
the same for RGBA PNGs (each one composited onto white and re-encoded, the slow path).
"""

from __future__ import annotations

import io
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.config import Settings
from worker.datasets import Limits
from worker.datasets.archive import archive_members
from worker.datasets.prepare import prepare

SIDE = 32
LIMITS = Limits(
    max_source_bytes=Settings.model_fields["max_dataset_bytes"].default,
    max_unpacked_bytes=Settings.model_fields["dataset_max_unpacked_bytes"].default,
    max_ratio=Settings.model_fields["dataset_max_ratio"].default,
    max_image_pixels=Settings.model_fields["dataset_max_image_pixels"].default,
    min_image_side=Settings.model_fields["dataset_min_image_side"].default,
)


def _pngs(count: int, channels: int) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {}
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, channels), dtype=np.uint8)).save(buffer, "PNG")
        files[f"images/{i:06d}.png"] = buffer.getvalue()
    return files


def _archive(path: Path, kind: str, files: dict[str, bytes]) -> Path:
    if kind == "zip":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return path
    with tarfile.open(path, "w:gz" if kind == "tar.gz" else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _measure(archive: Path, out: Path) -> tuple[float, int]:
    started = time.perf_counter()
    prepared = prepare(archive_members(archive, LIMITS), out, LIMITS)
    return time.perf_counter() - started, prepared.image_count


def run(short: bool) -> dict[str, Any]:
    count = 200 if short else 5000
    results: dict[str, Any] = {"images": count, "side": SIDE}
    print(f"prepare: {count} {SIDE}x{SIDE} PNGs per archive (random pixels)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        root = Path(tmp)
        for label, channels, kinds in (("RGB", 3, ("zip", "tar", "tar.gz")), ("RGBA", 4, ("zip",))):
            files = _pngs(count, channels)
            for kind in kinds:
                archive = _archive(root / f"{label}.{kind}", kind, files)
                seconds, images = _measure(archive, root / f"out-{label}-{kind}")
                assert images == count, (images, count)
                rate = images / seconds
                results[f"{label} {kind} images/s"] = round(rate, 1)
                size_mb = archive.stat().st_size / 2**20
                print(f"  {label:4} {kind:6} ({size_mb:5.1f} MiB): {seconds:6.2f} s, {rate:8.0f} images/s", flush=True)
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--short", action="store_true")
    run(short=parser.parse_args().short)
