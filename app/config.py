"""One Settings class: every setting comes from a `DDPM_`-prefixed environment variable.

Every setting has a working default for the embedded mode (`make run`): SQLite and a
filesystem broker under `DDPM_DATA_DIR`, so nothing outside this machine is needed.
Deployments set `DDPM_DATABASE_URL` (PostgreSQL) and `DDPM_BROKER_URL` (Redis).

A refused start never shows a secret: errors leave out the input values (pydantic would print the
whole input, every secret in it, for a model-level error), and no message quotes one.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url

from app.auth.keys import KEY_PATTERN
from app.embedded import DEFAULT_DATA_DIR, DEFAULT_HOST, DEFAULT_PORT

# Allowed only in development: outside it, Settings refuses to start with these.
DEV_SECRET_KEY = "dev-insecure-secret"
DEFAULT_DB_PASSWORDS = frozenset({"postgres", "password", "change-me", "changeme", "ddpm", "secret"})
# Outside development the secret key must be this long and look this random (see secret_strength_bits).
MIN_SECRET_LENGTH = 32
MIN_SECRET_BITS = 128


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DDPM_", extra="ignore", hide_input_in_errors=True)

    env: Literal["development", "production"] = "development"
    data_dir: Path = Field(
        DEFAULT_DATA_DIR, description="Embedded mode's home: SQLite file, broker folder, checkpoints."
    )
    database_url: str = Field("", description="SQLAlchemy URL; empty = SQLite file under data_dir.")
    broker_url: str = Field("", description="Celery broker URL; empty = filesystem transport under data_dir.")
    checkpoint_dir: Path | None = Field(
        None, description="Where workers write checkpoints; default data_dir/checkpoints."
    )
    queue: str = Field("ddpm", description="Celery queue the API sends training tasks to and workers consume.")
    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    # What a client must send in time, and how much of it (app/server.py): a slow or huge request
    # head or body cannot hold a connection. Responses (event streams, downloads) have no deadline.
    header_timeout_s: float = Field(10.0, gt=0, description="Seconds a request's head may take to arrive (408).")
    body_timeout_s: float = Field(30.0, gt=0, description="Seconds a request's body may take after its head (408).")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="Largest request head accepted (431).")
    # How often a running job's worker renews its lease, and when the lease counts as lost.
    heartbeat_interval_s: float = Field(10.0, gt=0)
    lease_timeout_s: float = Field(120.0, gt=0)
    # A job whose worker is lost this many times (lease expired) fails instead of resuming again.
    max_attempts: int = Field(5, ge=1)
    # The log lines a worker keeps of one attempt (GET /v1/jobs/{id}/logs); past it, one line says
    # the rest were dropped (they are still on the worker's console). 0: keep none.
    job_log_max_lines: int = Field(10_000, ge=0, le=1_000_000)
    # How long a queued job may wait before the worker's sweeper sends its task again
    # (a message lost while the broker was down, or a job queued before a restart).
    resend_after_s: float = Field(60.0, gt=0)
    # Redis re-delivers a task not acknowledged within this time (the claim makes that harmless).
    broker_visibility_timeout_s: float = Field(3600.0, gt=0)
    # How often the API reads a watched job's new events (one reader per job, for all watchers).
    events_poll_interval_s: float = Field(0.5, gt=0)
    # Device the worker trains on: "auto" = CUDA when available, else CPU.
    device: str = "auto"
    # What this worker advertises (app/routing.py): it consumes only the queues of jobs that fit.
    # Default: the visible CUDA devices (CUDA_VISIBLE_DEVICES) and the smallest one's memory,
    # rounded up to whole GiB; on a CPU-only worker, 1 "GPU" (a process) with the host's memory less
    # a margin (worker/capacity.py).
    worker_gpus: int | None = Field(None, ge=1, le=64, description="GPUs this worker offers; default: detected.")
    worker_gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory per GPU this worker offers, in GiB; default: detected."
    )
    # A file the worker's sweeper touches after every check-in (so: alive, and its database
    # answers), removed when the worker stops; compose's worker healthcheck reads its age.
    worker_health_file: Path | None = Field(None, description="Touched by the worker every sweep; unset = none.")
    # "samples": a light worker that only draws on-demand samples (its own queue), so a request
    # never waits behind training; "all" (a regular worker) trains and draws samples too.
    worker_role: Literal["all", "samples"] = Field("all", description="What this worker consumes.")
    # `ddpm-jobs serve` gives its workers this long to checkpoint and exit before it kills them.
    stop_grace_s: float = Field(60.0, gt=0, description="Seconds serve waits for its workers to stop.")

    # PostgreSQL connection pool of each process (the API's routes, the worker's sweeper). A
    # request that waits db_pool_timeout_s for a connection is answered 503 with Retry-After.
    db_pool_size: int = Field(10, ge=1, description="Connections each process keeps open to PostgreSQL.")
    db_max_overflow: int = Field(10, ge=0, description="Connections opened beyond db_pool_size under load.")
    db_pool_timeout_s: float = Field(30.0, gt=0, description="How long a request waits for a free connection.")

    # --- keys ---------------------------------------------------------------------------------
    # API keys are stored as HMAC-SHA256(secret_key, key): a leaked table alone opens nothing.
    secret_key: str = Field(
        DEV_SECRET_KEY, repr=False, description="HMAC key for API-key hashes; required outside development."
    )
    # Applied at API start: this key (made by `ddpm-jobs keys generate`) exists as an admin key.
    bootstrap_api_key: str | None = Field(
        None, repr=False, description="An admin API key the API ensures exists at start."
    )

    # --- limits: what one request or one user may ask of the service ----------------------------
    max_queued_jobs_per_user: int = Field(10, ge=1, description="Queued + running jobs one user may have.")
    max_steps: int = Field(1_000_000, ge=1, description="Largest training.steps accepted.")
    max_batch_size: int = Field(1024, ge=1, description="Largest training.batch_size accepted.")
    max_image_size: int = Field(512, ge=4, description="Largest dataset.image_size accepted.")
    max_channels: int = Field(1024, ge=1, description="Largest entry of model.channels (per U-Net level).")
    max_timesteps: int = Field(10_000, ge=2, description="Largest diffusion.timesteps accepted.")
    max_parameters: int = Field(200_000_000, ge=1, description="Largest U-Net parameter count accepted.")
    gpu_memory_gb: float = Field(
        80.0, gt=0, description="The largest GPU memory of any worker; a job's per-GPU estimate must fit."
    )
    max_gpus_per_job: int = Field(8, ge=1, description="Largest resources.gpus accepted.")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Request bodies above this are refused with 413.")
    # `folder` data sets must lie under one of these (after following symlinks); a relative
    # dataset.path is relative to the first. Default: [data_dir/datasets]. Env: JSON list or
    # comma-separated paths.
    data_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Whether the API also checks at submit that a `folder` data set is a directory holding
    # images: "auto" when the data root it lies under exists on the API's host (the embedded
    # mode, or a container with the data volume mounted), "always", or "never" (the workers'
    # data is out of the API's sight: they report a missing folder when the job starts).
    dataset_folder_check: Literal["auto", "always", "never"] = "auto"

    # --- data sets (POST /v1/datasets): uploads, sources, preparation ---------------------------
    max_dataset_bytes: int = Field(
        20 * 2**30, ge=1, description="Largest upload or fetched source accepted, in bytes (413 above it)."
    )
    dataset_quota_bytes: int = Field(
        100 * 2**30, ge=1, description="Storage one user's data sets may take together, in bytes (429 above it)."
    )
    max_datasets_per_user: int = Field(200, ge=1, description="Data sets one user may hold (429 above it).")
    # Preparation refuses an archive that unpacks to more than this, or more than
    # dataset_max_ratio times its own size (a zip bomb), and skips an image of more pixels.
    dataset_max_unpacked_bytes: int = Field(
        100 * 2**30, ge=1, description="Largest total size an archive's members may unpack to."
    )
    dataset_max_ratio: float = Field(200.0, gt=1, description="Largest unpacked/packed size ratio of an archive.")
    dataset_max_image_pixels: int = Field(
        64_000_000, ge=1, description="Images with more pixels are skipped (decompression bombs)."
    )
    dataset_min_image_side: int = Field(8, ge=1, description="Images narrower or lower than this are skipped.")
    # An upload that stops arriving (broken off and never resumed) is deleted, bytes and row,
    # this long after its last byte.
    dataset_upload_expiry_s: float = Field(24 * 3600.0, gt=0, description="Seconds an idle upload is kept.")
    # https:// sources: loopback, private, link-local and other non-global addresses are refused
    # (no request forgery through the service) unless this is set (tests, a private mirror).
    dataset_url_allow_private: bool = False
    # hf:// sources: a local directory standing in for the Hub (hf://ns/name reads <dir>/ns/name
    # with the same `datasets` code path); empty = the Hub itself.
    hf_datasets_dir: Path | None = None

    # --- evaluation (FID/KID in the loop) ------------------------------------------------------
    # The Inception-v3 feature network for FID on users' images: a TorchScript file (NVIDIA's
    # port of TF-FID's inception-2015-12-05, as StyleGAN2-ADA, EDM and clean-fid use), read only
    # from this path and only when its sha256 matches fid_weights_sha256; nothing is downloaded.
    # Unset: jobs on users' images report "evaluation unavailable" and train on. (The digits set
    # uses a small classifier of its own and needs neither.)
    fid_weights: Path | None = Field(None, description="Path of the Inception TorchScript file for FID.")
    fid_weights_sha256: str = Field(
        "", pattern=r"^([0-9a-f]{64})?$", description="The sha256 fid_weights must have (lowercase hex)."
    )

    # --- training speed -------------------------------------------------------------------------
    # The worker's GPU's dense bf16 peak, for the MFU of metric points, when its name is not in
    # worker/ddpm/efficiency.py's table (there, it overrides the table). Unset there: no MFU.
    peak_tflops: float | None = Field(
        None, gt=0, le=1e6, description="This worker's GPU's dense bf16 peak in TFLOP/s, for MFU."
    )

    # --- team operations: fair scheduling, retention, webhooks, observability -------------------
    # A user's running jobs may hold at most this many GPUs together (resources.gpus; on a CPU
    # worker, processes); a job over it waits, with a waiting_reason saying so. 0: no cap.
    max_running_gpus_per_user: int = Field(0, ge=0, description="GPUs one user's running jobs may hold; 0 = no cap.")
    # Finished jobs older than this keep at most metrics_retention_points metric points (the
    # curve downsampled); 0 keeps every point for ever.
    metrics_retention_days: float = Field(
        0.0, ge=0, description="Days after which a finished job's loss curve is downsampled; 0 = never."
    )
    metrics_retention_points: int = Field(1000, ge=10, description="Metric points a downsampled job keeps.")
    # Webhook targets on loopback, private, link-local and other non-global addresses are refused
    # (no request forgery through the service) unless this is set (tests, an internal receiver).
    webhook_allow_private: bool = False
    webhook_timeout_s: float = Field(10.0, gt=0, le=60, description="Seconds a webhook receiver has to answer.")
    webhook_retry_for_s: float = Field(
        24 * 3600.0, gt=0, description="How long a failing delivery is retried (exponential backoff) before it fails."
    )
    max_webhooks_per_user: int = Field(20, ge=1, description="Webhook endpoints one user may register.")
    # Logs of the API and the workers: "text" for people, "json" (one object per line, with the
    # job id, attempt and worker where there is one) for log collectors.
    log_format: Literal["text", "json"] = "text"
    # GET /metrics (Prometheus) answers an admin API key, or this bearer token (for the scraper).
    metrics_token: SecretStr = Field(SecretStr(""), description="Bearer token Prometheus scrapes /metrics with.")

    # --- checkpoint storage: the local checkpoint directory, or an S3-compatible bucket ---------
    # With "s3", workers still write every file into checkpoint_dir first (scratch), upload it,
    # then record its row; the API reads from the bucket. Keys are the same relative paths.
    storage: Literal["local", "s3"] = "local"
    s3_endpoint_url: str = Field("", description="S3-compatible endpoint (MinIO, ...); empty = AWS.")
    s3_bucket: str = ""
    s3_prefix: str = Field("", description="Prepended to every object key, e.g. `ddpm/`.")
    s3_region: str = "us-east-1"
    # Empty: boto3's own chain (AWS_* variables, instance role, ...).
    s3_access_key_id: str = ""
    s3_secret_access_key: SecretStr = SecretStr("")
    # "stream": the API reads the object and sends it on; "redirect": 307 to a presigned GET URL.
    s3_download: Literal["stream", "redirect"] = "stream"
    s3_presign_expires_s: int = Field(300, ge=1, le=7 * 24 * 3600)
    s3_multipart_threshold_mb: int = Field(64, ge=1, description="Files above this upload in parts.")

    @field_validator("bootstrap_api_key")
    @classmethod
    def _well_formed_key(cls, value: str | None) -> str | None:
        if value and not KEY_PATTERN.match(value):
            raise ValueError("DDPM_BOOTSTRAP_API_KEY must be a key as `ddpm-jobs keys generate` prints it")
        return value or None

    @field_validator("secret_key")
    @classmethod
    def _random_secret_outside_development(cls, value: str, info: ValidationInfo) -> str:
        env = info.data.get("env", "development")
        if env == "development":
            return value
        if value == DEV_SECRET_KEY or len(value) < MIN_SECRET_LENGTH or secret_strength_bits(value) < MIN_SECRET_BITS:
            raise ValueError(
                f"DDPM_SECRET_KEY must be a random value of at least {MIN_SECRET_LENGTH} characters when "
                f"DDPM_ENV={env}: the one given is too short or too repetitive (under {MIN_SECRET_BITS} bits); "
                "make one with `openssl rand -hex 32` or `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return value

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [part for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'ddpm.db').resolve()}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.checkpoint_dir is None:
            self.checkpoint_dir = self.data_dir / "checkpoints"
        self.checkpoint_dir = self.checkpoint_dir.resolve()
        if not self.data_roots:
            self.data_roots = [self.data_dir / "datasets"]
        self.data_roots = [root.resolve() for root in self.data_roots]
        return self

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Settings:
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("DDPM_STORAGE=s3 needs DDPM_S3_BUCKET (and DDPM_S3_ENDPOINT_URL unless on AWS)")
        return self

    @model_validator(mode="after")
    def _no_default_database_password_outside_development(self) -> Settings:
        if self.env == "development":
            return self
        url = make_url(self.database_url)
        if url.password is not None and url.password.lower() in DEFAULT_DB_PASSWORDS:
            raise ValueError(f"DDPM_DATABASE_URL uses a default password; set a random one when DDPM_ENV={self.env}")
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """repr() and logs of the settings show the database and broker URLs without a password."""
        for name, value in super().__repr_args__():
            yield name, (without_password(value) if name in ("database_url", "broker_url") else value)

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


def without_password(url: str) -> str:
    """`url` with its password, if any, shown as `***` (for repr and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def secret_strength_bits(value: str) -> float:
    """A rough strength estimate: length x the Shannon entropy of the value's own characters.

    It refuses what a person types (one character repeated, a short word repeated: few distinct
    characters) while 32+ characters of `openssl rand -hex` or `secrets.token_urlsafe` clear
    128 bits with a wide margin. It cannot tell a random value from a long varied phrase."""
    counts = Counter(value)
    per_char = -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values()) if value else 0.0
    return len(value) * per_char


@lru_cache
def get_settings() -> Settings:
    return Settings()
