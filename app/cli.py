"""`ddpm-jobs`: run the service.

    ddpm-jobs serve     the embedded default: migrate, then the API and one worker on this machine
    ddpm-jobs api       the API alone (compose's `api` service)
    ddpm-jobs migrate   alembic upgrade head (compose's one-shot `migrate` service)

Workers run as `celery -A worker.celery_app worker --pool=solo --concurrency=1` (WORKER_COMMAND).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import typer
import uvicorn

from app.config import get_settings
from app.db import upgrade_database

# One process per GPU, solo pool: CUDA is never initialised in a forked parent.
WORKER_COMMAND = ["celery", "-A", "worker.celery_app", "worker", "--pool=solo", "--concurrency=1", "--loglevel=INFO"]

cli = typer.Typer(add_completion=False, help="Run the ddpm-jobs service.")


@cli.command()
def migrate() -> None:
    """Bring the database schema to the newest revision."""
    settings = get_settings()
    upgrade_database(settings)
    typer.echo(f"database at head: {settings.database_url.split('@')[-1]}")


@cli.command()
def api() -> None:
    """Serve the HTTP API on DDPM_HOST:DDPM_PORT."""
    settings = get_settings()
    uvicorn.run("app.main:create_app", factory=True, host=settings.host, port=settings.port, log_level="info")


@cli.command()
def serve() -> None:
    """The embedded default: SQLite and a filesystem broker under DDPM_DATA_DIR, the API and a worker."""
    settings = get_settings()
    upgrade_database(settings)
    settings.checkpoint_root.mkdir(parents=True, exist_ok=True)
    worker = subprocess.Popen([sys.executable, "-m", *WORKER_COMMAND], env=os.environ.copy(), start_new_session=True)
    typer.echo(
        f"ddpm-jobs: API on http://{settings.host}:{settings.port}, worker pid {worker.pid}, "
        f"data in {settings.data_dir.resolve()}"
    )
    try:
        uvicorn.run("app.main:create_app", factory=True, host=settings.host, port=settings.port, log_level="info")
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()


def main() -> None:
    cli()
