"""Settings refuse to start outside development with a default secret or database password."""

from __future__ import annotations

import pytest

from app.config import DEV_SECRET_KEY, Settings

GOOD_SECRET = "x" * 40
GOOD_DB = "postgresql+psycopg://ddpm:Zq8vN3kT0pLr@db:5432/ddpm"


def test_development_runs_on_the_defaults() -> None:
    assert Settings().secret_key == DEV_SECRET_KEY


def test_production_with_real_secrets_starts() -> None:
    s = Settings(env="production", secret_key=GOOD_SECRET, database_url=GOOD_DB)
    assert (s.env, s.secret_key) == ("production", GOOD_SECRET)


@pytest.mark.parametrize("secret", [DEV_SECRET_KEY, "short"])
def test_production_refuses_a_default_or_short_secret(secret: str) -> None:
    with pytest.raises(ValueError, match="DDPM_SECRET_KEY"):
        Settings(env="production", secret_key=secret, database_url=GOOD_DB)


@pytest.mark.parametrize("password", ["postgres", "password", "change-me", "CHANGE-ME"])
def test_production_refuses_a_default_database_password(password: str) -> None:
    with pytest.raises(ValueError, match="default password"):
        Settings(env="production", secret_key=GOOD_SECRET, database_url=f"postgresql://ddpm:{password}@db/ddpm")


def test_data_roots_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("DDPM_DATA_ROOTS", f"{tmp_path}/a,{tmp_path}/b")
    assert Settings().data_roots == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.setenv("DDPM_DATA_ROOTS", f'["{tmp_path}/c"]')
    assert Settings().data_roots == [tmp_path / "c"]
