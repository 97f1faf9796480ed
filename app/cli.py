"""`ddpm-jobs`: run the service.

    ddpm-jobs serve     the embedded default: migrate, then the API and two workers on this machine
    ddpm-jobs api       the API alone (compose's `api` service); prints a first admin key if none exists
    ddpm-jobs migrate   alembic upgrade head (compose's one-shot `migrate` service)
    ddpm-jobs keys      create, list and revoke API keys; generate one for DDPM_BOOTSTRAP_API_KEY

Workers run as `celery -A worker.celery_app worker --pool=solo --concurrency=1` (WORKER_COMMAND);
DDPM_WORKER_ROLE=samples makes one that only draws on-demand samples.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from app.auth import keys as key_format
from app.auth import service as auth
from app.client.cli import Column, print_json, print_table
from app.config import Settings, get_settings
from app.db import make_engine, make_sessionmaker, session_scope, upgrade_database
from app.embedded import PARENT_VARIABLE, api_key_path
from app.log_format import configure_logging
from app.models import Worker
from app.server import serve_api

# prometheus-client's multiprocess mode: the folder where each API process keeps its metrics.
MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# One process per GPU, solo pool: CUDA is never initialised in a forked parent.
WORKER_COMMAND = ["celery", "-A", "worker.celery_app", "worker", "--pool=solo", "--concurrency=1", "--loglevel=INFO"]
# `serve`'s workers: without Celery's banner, so the dashboard link stays in view. One trains
# (and draws samples when idle), one only draws samples: a request never waits behind training.
EMBEDDED_WORKER_COMMAND = [WORKER_COMMAND[0], "--quiet", *WORKER_COMMAND[1:]]
EMBEDDED_WORKER_ROLES = ("all", "samples")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

cli = typer.Typer(add_completion=False, help="Run the ddpm-jobs service.")
keys_cli = typer.Typer(add_completion=False, help="API keys: shown once at creation, stored as a hash.")
cli.add_typer(keys_cli, name="keys")

# The embedded service's first admin key, readable by its owner only.
LOCAL_USER = "local"
# `api`'s first admin key, when no DDPM_BOOTSTRAP_API_KEY makes one (the bootstrap key's user too).
BOOTSTRAP_USER = "admin"


def api_key_file(settings: Settings) -> Path:
    return api_key_path(settings.data_dir)


@cli.command()
def migrate() -> None:
    """Bring the database schema to the newest revision."""
    settings = get_settings()
    upgrade_database(settings)
    typer.echo(f"database at head: {settings.database_url.split('@')[-1]}")


@cli.command()
def api() -> None:
    """Serve the HTTP API on DDPM_HOST:DDPM_PORT (read deadlines and limits: app/server.py).

    Without DDPM_BOOTSTRAP_API_KEY, a first start (no key stored) prints a new admin key once."""
    settings = get_settings()
    configure_logging(settings)
    if not settings.bootstrap_api_key:
        announce_first_key(settings)
    if (folder := os.environ.get(MULTIPROC_VARIABLE)) is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)  # empty at each start: compose mounts a tmpfs
    serve_api(settings)


def announce_first_key(settings: Settings) -> None:
    """`api` without DDPM_BOOTSTRAP_API_KEY on a database that holds no key (compose's first
    start): an admin key for user "admin", printed this once to the log; later starts print none."""
    try:
        with _session(settings) as session:
            created = auth.create_first_admin_key(session, settings.secret_key, BOOTSTRAP_USER)
    except IntegrityError:
        return  # another API replica made the first key at the same moment
    except DBAPIError as exc:
        typer.echo(f"ddpm-jobs: could not check for API keys ({exc.orig}); none created", err=True)
        return
    if created is None:
        return
    typer.echo(f"ddpm-jobs: created admin API key for user {BOOTSTRAP_USER!r} (no key existed); store it now:")
    typer.echo(f"  {created.key}")
    typer.echo("  it is not shown again; make per-user keys with: ddpm-jobs keys create --user NAME")


def ensure_local_key(settings: Settings) -> None:
    """First start of the embedded service (no key at all): an admin key for user "local", saved
    (mode 0600) where README's curl examples read it. `serve` shows its dashboard link at every
    start, once the service is ready (`announce`)."""
    path = api_key_file(settings)
    with _session(settings) as session:
        created = auth.create_first_admin_key(session, settings.secret_key, LOCAL_USER)
        if created is None:
            return
        write_private(path, created.key + "\n")
    typer.echo(f"ddpm-jobs: created admin API key for user {LOCAL_USER!r}, saved to {path.resolve()}: {created.key}")


def write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read, replacing any older one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)  # in case the file existed with wider permissions
    os.replace(tmp, path)


@cli.command()
def serve() -> None:
    """The embedded default: SQLite and a filesystem broker under DDPM_DATA_DIR, the API, a worker
    and a samples-only worker. SIGTERM or Ctrl-C stops all three: a running job checkpoints and
    goes back to the queue (DDPM_STOP_GRACE_S to do so, then its worker is killed)."""
    settings = get_settings()
    configure_logging(settings)
    fresh_metrics_folder(settings)
    upgrade_database(settings)
    ensure_local_key(settings)
    settings.checkpoint_root.mkdir(parents=True, exist_ok=True)
    if (default_root := (settings.data_dir / "datasets").resolve()) in settings.data_roots:
        default_root.mkdir(parents=True, exist_ok=True)  # where `folder` data sets go by default
    with _exit_on_stop_signals(), embedded_workers(settings) as workers:
        serve_api(settings, on_started=lambda: _announce_when_ready(settings, workers))


def fresh_metrics_folder(settings: Settings) -> None:
    """GET /metrics in multiprocess mode (app/monitoring/process.py), in an empty folder of its own
    under DDPM_DATA_DIR unless PROMETHEUS_MULTIPROC_DIR names one (which must start empty); its
    workers inherit the setting. Set before prometheus_client is first imported, which reads it then."""
    if (given := os.environ.get(MULTIPROC_VARIABLE)) is not None:
        Path(given).mkdir(parents=True, exist_ok=True)  # the caller's to keep empty between runs
        return
    folder = settings.data_dir / "prometheus"
    shutil.rmtree(folder, ignore_errors=True)  # files of an earlier run's processes would be counted
    folder.mkdir(parents=True)
    os.environ[MULTIPROC_VARIABLE] = str(folder.resolve())


@contextmanager
def _exit_on_stop_signals() -> Iterator[None]:
    """SIGTERM and SIGINT end `serve` with SystemExit (exit 143, 130), so its cleanup runs.

    Uvicorn catches both while it serves, shuts down gracefully, then raises the signal again
    with the handler in place before it started: with the default SIGTERM handler that would end
    the process there, before any `finally` could stop the workers."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def embedded_workers(settings: Settings) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`serve`'s workers, one per role, stopped on the way out however `serve` ends.

    They share serve's process group: a terminal's Ctrl-C reaches them too (Celery's warm
    shutdown, as on SIGTERM), and whoever stops the group stops them with it. Should serve die
    without a chance to stop them (SIGKILL), the kernel sends them SIGTERM (PARENT_VARIABLE)."""
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for role in EMBEDDED_WORKER_ROLES:
            env = os.environ | {"DDPM_WORKER_ROLE": role, PARENT_VARIABLE: str(os.getpid())}
            workers.append(subprocess.Popen([sys.executable, "-m", *EMBEDDED_WORKER_COMMAND], env=env))
        yield workers
    finally:
        stop_workers(workers, settings.stop_grace_s)


def stop_workers(workers: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM to every worker (a running job checkpoints at its next log point and goes back to
    the queue), then wait for all of them for up to `grace_s`, and kill what is left. Further
    stop signals are ignored meanwhile: the wait is what keeps a job from being left `running`."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for worker in workers:
            try:
                worker.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                typer.echo(f"ddpm-jobs: worker pid {worker.pid} did not stop within {grace_s:g} s; killed", err=True)
                worker.kill()
                worker.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _announce_when_ready(settings: Settings, workers: list[subprocess.Popen[bytes]]) -> None:
    """Called by the API once it listens: print the dashboard link when the workers are ready too
    (checked in), so it is the last thing on the console at start, below their logs."""
    threading.Thread(target=announce, args=(settings, workers), name="announce", daemon=True).start()


def announce(settings: Settings, workers: list[subprocess.Popen[bytes]], timeout_s: float = 120.0) -> None:
    names = {f"{socket.gethostname()}:{worker.pid}" for worker in workers}
    engine = make_engine(settings)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and all(worker.poll() is None for worker in workers):
            with engine.connect() as conn:
                if set(conn.scalars(select(Worker.name).where(Worker.name.in_(names)))) == names:
                    break
            time.sleep(0.2)
    finally:
        engine.dispose()
    print(ready_message(settings, workers), flush=True)


def ready_message(settings: Settings, workers: list[subprocess.Popen[bytes]]) -> str:
    url, path = f"http://{settings.host}:{settings.port}", api_key_file(settings)
    roles = {"all": "training", "samples": "samples"}
    pids = " and ".join(f"{w.pid} ({roles[r]})" for w, r in zip(workers, EMBEDDED_WORKER_ROLES, strict=False))
    lines = [f"ddpm-jobs: ready. API on {url}, workers pid {pids}, data in {settings.data_dir.resolve()}"]
    lines += [f"ddpm-jobs: worker pid {w.pid} exited with code {w.returncode}" for w in workers if w.poll() is not None]
    if path.exists():
        key = path.read_text().strip()
        lines += [
            f"  dashboard: {url}/#key={key}",
            f'  curl -H "Authorization: Bearer $(cat {path.resolve()})" {url}/v1/jobs',
        ]
    else:
        lines.append(f"  dashboard: {url}/ (sign in with a key from `ddpm-jobs keys create --user NAME`)")
    lines.append("  stop: Ctrl-C or SIGTERM (a running job saves a checkpoint and goes back to the queue)")
    return "\n".join(lines)


@keys_cli.command("create")
def keys_create(
    user: str = typer.Option(..., "--user", help="The key's user; created if new."),
    admin: bool = typer.Option(False, "--admin", help="Make the user an admin (sees every user's jobs)."),
) -> None:
    """Create an API key for USER and print it. It is shown this once only."""
    settings = get_settings()
    with _session(settings) as session:
        created = auth.create_key(session, settings.secret_key, user, admin=admin)
    typer.echo(created.key)
    role = "admin" if created.user.is_admin else "user"
    typer.echo(f"key {created.prefix} for {role} {user!r}; store it now, it is not shown again", err=True)


KEY_COLUMNS = [
    Column("prefix"),
    Column("user", shrink=True),
    Column("admin"),
    Column("created", drop=1),
    Column("last used", drop=2),
    Column("revoked"),
]


@keys_cli.command("list")
def keys_list(
    as_json: bool = typer.Option(False, "--json", help="Print the keys as JSON objects instead of a table."),
) -> None:
    """Every key: prefix, user, admin, created, last used, revoked. Never the key itself."""
    settings = get_settings()
    with _session(settings) as session:
        listed = [
            {
                "prefix": key.prefix,
                "user": user.name,
                "admin": user.is_admin,
                **{
                    name: when.isoformat(timespec="seconds") if when else None
                    for name, when in (
                        ("created_at", key.created_at),
                        ("last_used_at", key.last_used_at),
                        ("revoked_at", key.revoked_at),
                    )
                },
            }
            for key, user in auth.list_keys(session)
        ]
    if as_json:
        print_json(listed)
        return
    rows = [
        [k["prefix"], k["user"], "yes" if k["admin"] else "no"]
        + [k[name] or "-" for name in ("created_at", "last_used_at", "revoked_at")]
        for k in listed
    ]
    print_table(KEY_COLUMNS, rows)


@keys_cli.command("revoke")
def keys_revoke(prefix: str = typer.Argument(..., help="The key's prefix, as `keys list` shows it.")) -> None:
    """Revoke a key: requests with it are refused (401) from now on."""
    settings = get_settings()
    try:
        with _session(settings) as session:
            key = auth.revoke_key(session, prefix)
    except auth.KeyNotFound as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"revoked {key.prefix} at {key.revoked_at.isoformat(timespec='seconds') if key.revoked_at else '?'}")


@keys_cli.command("generate")
def keys_generate() -> None:
    """Print a new well-formed key without storing it: a value for DDPM_BOOTSTRAP_API_KEY."""
    typer.echo(key_format.generate_key().key)


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
    engine = make_engine(settings)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            yield session
    finally:
        engine.dispose()


def main() -> None:
    cli()
