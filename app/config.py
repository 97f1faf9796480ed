"""One Settings class: every setting comes from a `DDPM_`-prefixed environment variable.

Every setting has a working default for the embedded mode (`make run`): SQLite and a
filesystem broker under `DDPM_DATA_DIR`, so nothing outside this machine is needed.
Deployments set `DDPM_DATABASE_URL` (PostgreSQL) and `DDPM_BROKER_URL` (Redis).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DDPM_", extra="ignore")

    env: Literal["development", "production"] = "development"
    data_dir: Path = Field(Path("var"), description="Embedded mode's home: SQLite file, broker folder, checkpoints.")
    database_url: str = Field("", description="SQLAlchemy URL; empty = SQLite file under data_dir.")
    broker_url: str = Field("", description="Celery broker URL; empty = filesystem transport under data_dir.")
    checkpoint_dir: Path | None = Field(
        None, description="Where workers write checkpoints; default data_dir/checkpoints."
    )
    queue: str = Field("ddpm", description="Celery queue the API sends training tasks to and workers consume.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # How often a running job's worker renews its lease, and when the lease counts as lost.
    heartbeat_interval_s: float = Field(10.0, gt=0)
    lease_timeout_s: float = Field(120.0, gt=0)
    # A job whose worker is lost this many times (lease expired) fails instead of resuming again.
    max_attempts: int = Field(5, ge=1)
    # How long a queued job may wait before the worker's sweeper sends its task again
    # (a message lost while the broker was down, or a job queued before a restart).
    resend_after_s: float = Field(60.0, gt=0)
    # Redis re-delivers a task not acknowledged within this time (the claim makes that harmless).
    broker_visibility_timeout_s: float = Field(3600.0, gt=0)
    # Device the worker trains on: "auto" = CUDA when available, else CPU.
    device: str = "auto"

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'ddpm.db').resolve()}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.checkpoint_dir is None:
            self.checkpoint_dir = self.data_dir / "checkpoints"
        self.checkpoint_dir = self.checkpoint_dir.resolve()
        return self

    @property
    def checkpoint_root(self) -> Path:
        assert self.checkpoint_dir is not None  # filled in by the validator
        return self.checkpoint_dir

    @property
    def broker_folder(self) -> Path:
        """The filesystem broker's message folder (embedded mode only)."""
        return (self.data_dir / "broker").resolve()

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
