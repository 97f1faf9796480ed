"""Shared fixtures: a fresh PostgreSQL database per test session (built with `alembic upgrade
head`, so every run tests the migrations), the real Redis, and a unique Celery queue so runs on
one machine never consume each other's tasks. Everything started here is stopped here."""

from __future__ import annotations

import io
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import psycopg
import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import text

from app.auth.service import create_key
from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope, upgrade_database
from app.models import Evaluation, User

PG_ADMIN_URL = os.environ.get("DDPM_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DDPM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"ddpm_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    redis.Redis.from_url(REDIS_URL).ping()
    return REDIS_URL


@pytest.fixture(scope="session")
def service_settings(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data = tmp_path_factory.mktemp("ddpm-data")
    settings = Settings(
        database_url=pg_url,
        broker_url=redis_url,
        queue=f"ddpm-test-{uuid.uuid4().hex[:8]}",
        data_dir=data,
        checkpoint_dir=data / "checkpoints",
        heartbeat_interval_s=1.0,
        lease_timeout_s=30.0,
        resend_after_s=5.0,
    )
    upgrade_database(settings)
    return settings


@pytest.fixture
def clean_db(service_settings: Settings) -> Iterator[Settings]:
    engine = make_engine(service_settings)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs, metric_points, checkpoints, datasets, api_keys, users, workers CASCADE"))
    engine.dispose()
    yield service_settings


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What the root logger writes at INFO through a DDPM_LOG_FORMAT=json handler while the test runs,
    with no job bound by an earlier test (tests call the claim outside a delivery's scope)."""
    from app.log_format import log_scope, use_json

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    use_json(handler)
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)  # setLevel, not the attribute: loggers cache what a level lets through
    try:
        with log_scope(clear=True):
            yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@dataclass(frozen=True)
class ApiUser:
    """A user with one API key, as the tests use them."""

    user: User
    key: str
    prefix: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


MakeUser = Callable[..., ApiUser]


@pytest.fixture
def make_user(clean_db: Settings) -> Iterator[MakeUser]:
    """`make_user("alice", admin=False)`: a user (created if new) and a fresh API key."""
    engine = make_engine(clean_db)
    factory = make_sessionmaker(engine)

    def make(name: str | None = None, *, admin: bool = False) -> ApiUser:
        with session_scope(factory) as s:
            created = create_key(s, clean_db.secret_key, name or f"user-{uuid.uuid4().hex[:8]}", admin=admin)
        return ApiUser(user=created.user, key=created.key, prefix=created.prefix)

    yield make
    engine.dispose()


@pytest.fixture
def owner(make_user: MakeUser) -> User:
    """A user to own jobs created through the service functions."""
    return make_user("owner").user


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on loopback, for the object-storage tests."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in test logs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_settings(clean_db: Settings, s3_endpoint: str, tmp_path: Path) -> Settings:
    """clean_db's service with DDPM_STORAGE=s3: a fresh bucket on the moto server, and a scratch
    checkpoint root of this test's own."""
    settings = clean_db.model_copy(
        update={
            "storage": "s3",
            "s3_endpoint_url": s3_endpoint,
            "s3_bucket": f"ddpm-test-{uuid.uuid4().hex[:12]}",
            "s3_prefix": "ckpt/",
            "s3_access_key_id": "testing",
            "s3_secret_access_key": SecretStr("testing"),
            "checkpoint_dir": (tmp_path / "scratch").resolve(),
        }
    )
    s3_client(settings).create_bucket(Bucket=settings.s3_bucket)
    return settings


def s3_client(settings: Settings):  # type: ignore[no-untyped-def]
    """A plain boto3 client of the test's bucket, to look at (or tamper with) what is stored."""
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=settings.s3_secret_access_key.get_secret_value(),
    )


def bucket_keys(settings: Settings) -> set[str]:
    """Every object key in the test's bucket (with the prefix)."""
    pages = s3_client(settings).get_paginator("list_objects_v2").paginate(Bucket=settings.s3_bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def service_env(settings: Settings) -> dict[str, str]:
    """The environment a subprocess (API, worker) needs to join the service `settings` describe."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_")}
    env.update(
        DDPM_DATABASE_URL=settings.database_url,
        DDPM_BROKER_URL=settings.broker_url,
        DDPM_QUEUE=settings.queue,
        DDPM_DATA_DIR=str(settings.data_dir),
        DDPM_CHECKPOINT_DIR=str(settings.checkpoint_root),
        DDPM_HEARTBEAT_INTERVAL_S="1",
        DDPM_LEASE_TIMEOUT_S="30",
        DDPM_RESEND_AFTER_S="5",
        PYTHONUNBUFFERED="1",
    )
    if settings.storage == "s3":
        env.update(
            DDPM_STORAGE="s3",
            DDPM_S3_ENDPOINT_URL=settings.s3_endpoint_url,
            DDPM_S3_BUCKET=settings.s3_bucket,
            DDPM_S3_PREFIX=settings.s3_prefix,
            DDPM_S3_REGION=settings.s3_region,
            DDPM_S3_ACCESS_KEY_ID=settings.s3_access_key_id,
            DDPM_S3_SECRET_ACCESS_KEY=settings.s3_secret_access_key.get_secret_value(),
            DDPM_S3_DOWNLOAD=settings.s3_download,
        )
    return env


@pytest.fixture
def settings_env(service_settings: Settings) -> dict[str, str]:
    """The environment a subprocess (API, worker) needs to join this test's service."""
    return service_env(service_settings)


ARTIFACTS = Path(os.environ.get("DDPM_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


# The figures evaluation_row fills in besides the step and the FID.
EVALUATION_FIGURES: dict[str, object] = {
    "kid": 0.01,
    "kid_std": 0.002,
    "samples": 1000,
    "reference_images": 1797,
    "feature_network": "digits-classifier",
    "seconds": 2.5,
}


def evaluation_row(job_id: uuid.UUID | str, step: int, fid: float, **fields: object) -> Evaluation:
    """An `evaluations` row with plausible figures, for tests that need FIDs without training."""
    return Evaluation(job_id=uuid.UUID(str(job_id)), step=step, fid=fid, **(EVALUATION_FIGURES | fields))
