"""Settings refuse to start outside development with a default or weak secret or database
password, and never show a secret while refusing."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from app.config import DEV_SECRET_KEY, Settings

GOOD_SECRET = "Jq3vW9xLm2Tz7RkP0cYh5NfB8sDg4AeU"  # 32 varied characters
GOOD_DB = "postgresql+psycopg://ddpm:Zq8vN3kT0pLr@db:5432/ddpm"
# Long enough, but only nine distinct characters: refused, and it must not show in the error.
WEAK_SECRET = "daxyz0123" * 4


def fragments(secret: str, size: int = 4) -> set[str]:
    """Every run of `size` characters of `secret`: none may appear in an error."""
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


def test_development_runs_on_the_defaults() -> None:
    assert Settings().secret_key == DEV_SECRET_KEY


def test_production_with_real_secrets_starts() -> None:
    s = Settings(env="production", secret_key=GOOD_SECRET, database_url=GOOD_DB)
    assert (s.env, s.secret_key) == ("production", GOOD_SECRET)


@pytest.mark.parametrize("make", [lambda: secrets.token_urlsafe(32), lambda: secrets.token_hex(32)])
def test_production_accepts_generated_secrets(make) -> None:
    for _ in range(20):
        Settings(env="production", secret_key=make(), database_url=GOOD_DB)


@pytest.mark.parametrize(
    "secret", [DEV_SECRET_KEY, "short", "a" * 32, "ab" * 20, "password" * 4, WEAK_SECRET], ids=repr
)
def test_production_refuses_a_default_short_or_repetitive_secret(secret: str) -> None:
    with pytest.raises(ValidationError, match="DDPM_SECRET_KEY"):
        Settings(env="production", secret_key=secret, database_url=GOOD_DB)


def test_a_refused_secret_is_not_shown() -> None:
    with pytest.raises(ValidationError, match="DDPM_SECRET_KEY") as refused:
        Settings(env="production", secret_key=WEAK_SECRET, database_url=GOOD_DB)
    shown = str(refused.value) + repr(refused.value)
    assert not {part for part in fragments(WEAK_SECRET) if part in shown}


def test_no_refusal_shows_a_secret() -> None:
    """A model-level error (here: S3 without a bucket) would print the whole input."""
    s3_secret = "Hs9Wq2Lk7Vb4Nm1Xc8Zr"
    with pytest.raises(ValidationError, match="DDPM_S3_BUCKET") as refused:
        Settings(
            env="production", secret_key=GOOD_SECRET, database_url=GOOD_DB, storage="s3", s3_secret_access_key=s3_secret
        )
    shown = str(refused.value) + repr(refused.value)
    for secret in (GOOD_SECRET, "Zq8vN3kT0pLr", s3_secret):
        assert not {part for part in fragments(secret) if part in shown}


def test_settings_repr_leaves_out_the_secret_key_and_url_passwords() -> None:
    broker = "redis://:Rb7Kq2Zx9Lm4@redis:6379/0"
    s = Settings(env="production", secret_key=GOOD_SECRET, database_url=GOOD_DB, broker_url=broker)
    shown = repr(s)
    for secret in (GOOD_SECRET, make_url(GOOD_DB).password, "Rb7Kq2Zx9Lm4"):
        assert secret and secret not in shown
    assert "redis://:***@redis:6379/0" in shown and f"{make_url(GOOD_DB).username}:***@" in shown
    assert s.database_url == GOOD_DB  # only what is shown changes


def test_a_refused_api_start_shows_no_part_of_the_secret(tmp_path: Path) -> None:
    short = "daQ7xyz0123"  # refused for its length
    env = os.environ | {"DDPM_ENV": "production", "DDPM_SECRET_KEY": short, "DDPM_DATA_DIR": str(tmp_path)}
    env.update(DDPM_DATABASE_URL=GOOD_DB, COLUMNS="200")
    cli = Path(sys.executable).parent / "ddpm-jobs"
    done = subprocess.run([cli, "api"], env=env, capture_output=True, text=True, timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "DDPM_SECRET_KEY must be a random value" in output
    assert not {part for part in fragments(short) if part in output}


@pytest.mark.parametrize("password", ["postgres", "password", "change-me", "CHANGE-ME"])
def test_production_refuses_a_default_database_password(password: str) -> None:
    with pytest.raises(ValueError, match="default password"):
        Settings(env="production", secret_key=GOOD_SECRET, database_url=f"postgresql://ddpm:{password}@db/ddpm")


def test_data_roots_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("DDPM_DATA_ROOTS", f"{tmp_path}/a,{tmp_path}/b")
    assert Settings().data_roots == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.setenv("DDPM_DATA_ROOTS", f'["{tmp_path}/c"]')
    assert Settings().data_roots == [tmp_path / "c"]
