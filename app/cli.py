"""`ddpm-jobs`: run the service.

    ddpm-jobs serve     the embedded default: migrate, then the API and one worker on this machine
    ddpm-jobs api       the API alone (compose's `api` service)
    ddpm-jobs migrate   alembic upgrade head (compose's one-shot `migrate` service)
    ddpm-jobs keys      create, list and revoke API keys; generate one for DDPM_BOOTSTRAP_API_KEY

Workers run as `celery -A worker.celery_app worker --pool=solo --concurrency=1` (WORKER_COMMAND).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session

from app.auth import keys as key_format
from app.auth import service as auth
from app.config import Settings, get_settings
from app.db import make_engine, make_sessionmaker, session_scope, upgrade_database
from app.embedded import api_key_path
from app.server import serve_api

# One process per GPU, solo pool: CUDA is never initialised in a forked parent.
WORKER_COMMAND = ["celery", "-A", "worker.celery_app", "worker", "--pool=solo", "--concurrency=1", "--loglevel=INFO"]

cli = typer.Typer(add_completion=False, help="Run the ddpm-jobs service.")
keys_cli = typer.Typer(add_completion=False, help="API keys: shown once at creation, stored as a hash.")
cli.add_typer(keys_cli, name="keys")

# The embedded service's first admin key, readable by its owner only.
LOCAL_USER = "local"


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
    """Serve the HTTP API on DDPM_HOST:DDPM_PORT (read deadlines and limits: app/server.py)."""
    settings = get_settings()
    serve_api(settings)


def ensure_local_key(settings: Settings) -> None:
    """First start of the embedded service (no key at all): an admin key for user "local",
    printed once and saved (mode 0600) where README's curl examples read it."""
    path = api_key_file(settings)
    with _session(settings) as session:
        if auth.has_any_key(session):
            if path.exists():
                typer.echo(f"ddpm-jobs: API key in {path.resolve()}")
            return
        created = auth.create_key(session, settings.secret_key, LOCAL_USER, admin=True)
        write_private(path, created.key + "\n")
    typer.echo(f"ddpm-jobs: created admin API key for user {LOCAL_USER!r}, saved to {path.resolve()}:")
    typer.echo(f"  {created.key}")
    typer.echo(f"  dashboard: http://{settings.host}:{settings.port}/#key={created.key}")
    typer.echo(f'  curl -H "Authorization: Bearer $(cat {path})" http://{settings.host}:{settings.port}/v1/jobs')


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
    """The embedded default: SQLite and a filesystem broker under DDPM_DATA_DIR, the API and a worker."""
    settings = get_settings()
    upgrade_database(settings)
    ensure_local_key(settings)
    settings.checkpoint_root.mkdir(parents=True, exist_ok=True)
    if (default_root := (settings.data_dir / "datasets").resolve()) in settings.data_roots:
        default_root.mkdir(parents=True, exist_ok=True)  # where `folder` data sets go by default
    # Same process group: whoever stops `serve` as a group (a terminal's Ctrl-C, a supervisor)
    # stops its worker too, and the `finally` below covers a plain SIGTERM to serve alone.
    worker = subprocess.Popen([sys.executable, "-m", *WORKER_COMMAND], env=os.environ.copy())
    typer.echo(
        f"ddpm-jobs: API on http://{settings.host}:{settings.port}, worker pid {worker.pid}, "
        f"data in {settings.data_dir.resolve()}"
    )
    try:
        serve_api(settings)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()


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


@keys_cli.command("list")
def keys_list() -> None:
    """Every key: prefix, user, admin, created, last used, revoked. Never the key itself."""
    settings = get_settings()
    with _session(settings) as session:
        rows = auth.list_keys(session)
    table = Table("prefix", "user", "admin", "created", "last used", "revoked", box=None)
    for key, user in rows:
        when = [
            c.isoformat(timespec="seconds") if c else "-" for c in (key.created_at, key.last_used_at, key.revoked_at)
        ]
        table.add_row(key.prefix, user.name, "yes" if user.is_admin else "no", *when)
    Console(width=160).print(table)


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
