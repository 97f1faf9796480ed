"""What every benchmark shares: the machine description, A/B rounds, medians, a results table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def machine() -> str:
    """One line: CPU, cores, accelerator, library versions, date."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    versions = f"torch {torch.__version__}"
    try:
        import diffusers

        versions += f", diffusers {diffusers.__version__}"
    except ImportError:
        pass
    python = f"Python {platform.python_version()}"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; {python}, {versions}; {time.strftime('%Y-%m-%d')}"


@dataclass
class Rounds:
    """Samples of several contenders taken in alternation (A, B, A, B, ... with the order rotated
    every round) so that drift and other people's load hit every side alike."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def run(self, rounds: int, contenders: dict[str, Callable[[], float]], first: int = 0) -> Rounds:
        """Rounds `first` .. `first + rounds - 1` (a caller that decides round by round whether
        another fits passes its round's index, so that the order still rotates)."""
        names = list(contenders)
        for i in range(first, first + rounds):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                value = contenders[name]()
                self.samples.setdefault(name, []).append(value)
                print(f"     round {i + 1}/{first + rounds} {name}: {value:.4g}", flush=True)
        return self

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, a: str, b: str) -> float:
        """median(a) / median(b)."""
        return self.median(a) / self.median(b)

    def paired_ratios(self, a: str, b: str) -> list[float]:
        """a / b within each round (the two ran back to back, under about the same load)."""
        return [x / y for x, y in zip(self.samples[a], self.samples[b], strict=True)]

    def report(self, unit: str) -> str:
        lines = []
        for name, xs in self.samples.items():
            spread = f"  (min {min(xs):.4g}, max {max(xs):.4g}, n={len(xs)})" if len(xs) > 1 else "  (n=1)"
            lines.append(f"  {name}: median {statistics.median(xs):.4g} {unit}{spread}")
        return "\n".join(lines)


def default_threads(device_type: str) -> int:
    """One intra-op thread on CPU: on a shared 2-core machine, OpenMP spin-waiting against other
    processes makes 2-thread timings swing tenfold; both sides of a ratio always get the same."""
    import torch

    return 1 if device_type == "cpu" else torch.get_num_threads()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


PG_ADMIN_URL = os.environ.get("DDPM_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DDPM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


@contextmanager
def throwaway_database() -> Iterator[str]:
    """A fresh PostgreSQL database (SQLAlchemy URL), dropped on the way out."""
    import uuid

    import psycopg

    name = f"ddpm_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def service_env(database_url: str, data: Path, port: int, api_key: str, **extra: str) -> dict[str, str]:
    """The environment of a benchmark's API and worker: this process's, without its DDPM_
    settings, joined to `database_url`, the bench Redis and a queue of its own, on the CPU."""
    import uuid

    env = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_")}
    env.update(
        DDPM_DATABASE_URL=database_url,
        DDPM_BROKER_URL=REDIS_URL,
        DDPM_QUEUE=f"ddpm-bench-{uuid.uuid4().hex[:8]}",
        DDPM_DATA_DIR=str(data),
        DDPM_CHECKPOINT_DIR=str(data / "checkpoints"),
        DDPM_PORT=str(port),
        DDPM_BOOTSTRAP_API_KEY=api_key,
        DDPM_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
    )
    return env | extra


@contextmanager
def process(argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """A process in its own session, stopped (SIGTERM, then SIGKILL) with its children on the way out.
    (The tests start their API and worker processes with it too.)"""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def http_arguments(prog: str) -> argparse.ArgumentParser:
    """The arguments of a client-side load tool: a URL, for how long, and `--header "Name: value"`."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("url")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--header", action="append", default=[])
    return parser


def headers_of(args: argparse.Namespace) -> dict[str, str]:
    return dict(h.split(": ", 1) for h in args.header)


def run_ranks(target: Callable[..., None], spec_json: str, world_size: int) -> Any:
    """Spawn `world_size` ranks of `target(rank, spec_json, init_method, out)`, wait for them, and
    return the JSON that the ranks wrote to `out`."""
    from worker.ddpm.distributed import free_port, spawn_ranks

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "report.json"
        context = spawn_ranks(target, (spec_json, f"tcp://127.0.0.1:{free_port()}", str(out)), world_size)
        while not context.join(timeout=600):
            pass
        return json.loads(out.read_text())


@contextmanager
def api_in_thread(settings: Any) -> Iterator[str]:
    """The API on a real uvicorn server (app/server.py's protocol and read deadlines) in a thread
    of this process, for as long as the block runs; yields its base URL."""
    import threading
    from functools import partial

    import uvicorn

    from app.main import create_app
    from app.server import DeadlineH11Protocol, ReadLimits
    from worker.ddpm.distributed import free_port

    port = free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        http=partial(DeadlineH11Protocol, limits=ReadLimits.of(settings)),  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="api-in-thread", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
