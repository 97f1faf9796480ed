"""API keys: format, storage, the 401s, last-used bookkeeping, bootstrap, CLI and the embedded
service's first key, and `ddpm-jobs api`'s first key when no bootstrap key is set."""

from __future__ import annotations

import json
import os
import re
import stat
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from typer.testing import CliRunner

from app import cli as cli_module
from app.auth.keys import KEY_PATTERN, generate_key, hash_key
from app.auth.service import KeyConflict, ensure_bootstrap_key
from app.config import Settings, get_settings
from app.db import make_engine, make_sessionmaker, session_scope, upgrade_database
from app.main import create_app
from app.models import ApiKey, User, utcnow
from tests.conftest import ApiUser, MakeUser
from tests.e2e.conftest import running_api


def _key_row(settings: Settings, prefix: str) -> ApiKey:
    with session_scope(make_sessionmaker(make_engine(settings))) as s:
        return s.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one()


class TestKeys:
    def test_keys_are_random_and_stored_only_as_an_hmac(self, clean_db: Settings, alice: ApiUser) -> None:
        match = KEY_PATTERN.match(alice.key)
        assert match is not None and match["prefix"] == alice.prefix
        assert len(match["secret"]) == 43  # 256 bits from secrets.token_urlsafe(32)
        assert generate_key().key != generate_key().key
        row = _key_row(clean_db, alice.prefix)
        assert row.key_hash == hash_key(clean_db.secret_key, alice.key)
        assert alice.key not in row.key_hash and match["secret"] not in row.key_hash

    def test_a_valid_key_opens_the_api(self, client: TestClient) -> None:
        assert client.get("/v1/jobs").status_code == 200

    @pytest.mark.parametrize(
        "authorization",
        [
            None,
            "",
            "Bearer",
            "Basic dXNlcjpwYXNz",
            "Bearer not-a-key",
            "Bearer ddpm_0123abcd_short",
            "Bearer ddpm_0123abcd_" + "A" * 43,  # well-formed, unknown
            "Token ddpm_0123abcd_" + "A" * 43,
        ],
    )
    def test_missing_malformed_or_unknown_keys_are_401(self, clean_db: Settings, authorization: str | None) -> None:
        headers = {} if authorization is None else {"Authorization": authorization}
        with TestClient(create_app(clean_db)) as c:
            r = c.get("/v1/jobs", headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "Bearer <key>" in r.json()["detail"]

    def test_a_key_with_a_known_prefix_and_another_secret_is_401(self, clean_db: Settings, alice: ApiUser) -> None:
        forged = f"ddpm_{alice.prefix}_" + "B" * 43
        with TestClient(create_app(clean_db)) as c:
            assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {forged}"}).status_code == 401

    def test_a_key_hashed_under_another_secret_key_is_401(self, clean_db: Settings, alice: ApiUser) -> None:
        other = clean_db.model_copy(update={"secret_key": "another-secret"})
        with TestClient(create_app(other), headers=alice.headers) as c:
            assert c.get("/v1/jobs").status_code == 401

    def test_a_revoked_key_is_401_and_other_keys_still_work(self, clean_db: Settings, make_user: MakeUser) -> None:
        first, second = make_user("carol"), make_user("carol")
        runner = CliRunner()
        result = runner.invoke(cli_module.cli, ["keys", "revoke", first.prefix], env=_cli_env(clean_db))
        assert result.exit_code == 0, result.output
        with TestClient(create_app(clean_db)) as c:
            assert c.get("/v1/jobs", headers=first.headers).status_code == 401
            assert c.get("/v1/jobs", headers=second.headers).status_code == 200

    def test_last_used_is_recorded_at_most_once_a_minute(self, clean_db: Settings, alice: ApiUser) -> None:
        assert _key_row(clean_db, alice.prefix).last_used_at is None
        with TestClient(create_app(clean_db), headers=alice.headers) as c:
            c.get("/v1/jobs")
            first = _key_row(clean_db, alice.prefix).last_used_at
            c.get("/v1/jobs")
            assert first is not None and _key_row(clean_db, alice.prefix).last_used_at == first
            with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
                s.execute(
                    update(ApiKey)
                    .where(ApiKey.prefix == alice.prefix)
                    .values(last_used_at=utcnow() - timedelta(minutes=2))
                )
            c.get("/v1/jobs")
        assert _key_row(clean_db, alice.prefix).last_used_at > first


class TestBootstrap:
    def test_the_bootstrap_key_becomes_an_admin_key_once(self, clean_db: Settings, alice: ApiUser) -> None:
        key = generate_key().key
        settings = clean_db.model_copy(update={"bootstrap_api_key": key})
        for _ in range(2):  # a restart finds it and changes nothing
            with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as c:
                assert c.get("/v1/jobs").status_code == 200
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
            rows = s.execute(select(ApiKey, User).join(User).where(ApiKey.prefix == key[5:13])).all()
        assert len(rows) == 1 and rows[0][1].is_admin and rows[0][1].name == "admin"

    def test_a_bootstrap_key_clashing_with_a_stored_prefix_is_refused(self, clean_db: Settings, alice: ApiUser) -> None:
        clash = f"ddpm_{alice.prefix}_" + "C" * 43
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s, pytest.raises(KeyConflict):
            ensure_bootstrap_key(s, clean_db.secret_key, clash)

    def test_a_malformed_bootstrap_key_is_refused_by_settings(self) -> None:
        with pytest.raises(ValueError, match="keys generate"):
            Settings(bootstrap_api_key="hunter2")


def _cli_env(settings: Settings) -> dict[str, str]:
    get_settings.cache_clear()
    return {
        "DDPM_DATABASE_URL": settings.database_url,
        "DDPM_DATA_DIR": str(settings.data_dir),
        "DDPM_SECRET_KEY": settings.secret_key,
    }


@pytest.fixture(autouse=True)
def _fresh_cli_settings():
    yield
    get_settings.cache_clear()


class TestCli:
    def test_create_list_revoke(self, clean_db: Settings) -> None:
        runner, env = CliRunner(), _cli_env(clean_db)
        created = runner.invoke(cli_module.cli, ["keys", "create", "--user", "dave", "--admin"], env=env)
        assert created.exit_code == 0, created.output
        key = created.stdout.strip().splitlines()[0]
        prefix = KEY_PATTERN.match(key)["prefix"]
        with TestClient(create_app(clean_db), headers={"Authorization": f"Bearer {key}"}) as c:
            assert c.get("/v1/jobs").status_code == 200
        listed = runner.invoke(cli_module.cli, ["keys", "list"], env=env)
        head, row = listed.stdout.splitlines()  # piped: plain aligned columns, nothing wrapped
        assert head.split() == ["prefix", "user", "admin", "created", "last", "used", "revoked"]
        assert row.split()[:3] == [prefix, "dave", "yes"] and row.split()[-1] == "-"  # used above, not revoked
        assert row.index("dave") == head.index("user") and row.index("yes") == head.index("admin")
        as_json = json.loads(runner.invoke(cli_module.cli, ["keys", "list", "--json"], env=env).stdout)
        assert [(k["prefix"], k["user"], k["admin"], k["revoked_at"]) for k in as_json] == [
            (prefix, "dave", True, None)
        ]
        assert key not in listed.stdout + json.dumps(as_json) and key[14:] not in listed.stdout
        assert runner.invoke(cli_module.cli, ["keys", "revoke", prefix], env=env).exit_code == 0
        with TestClient(create_app(clean_db), headers={"Authorization": f"Bearer {key}"}) as c:
            assert c.get("/v1/jobs").status_code == 401
        missing = runner.invoke(cli_module.cli, ["keys", "revoke", "ffffffff"], env=env)
        assert missing.exit_code == 1 and "ffffffff" in missing.output

    def test_generate_prints_a_well_formed_key_and_stores_nothing(self, clean_db: Settings) -> None:
        result = CliRunner().invoke(cli_module.cli, ["keys", "generate"], env=_cli_env(clean_db))
        assert KEY_PATTERN.match(result.stdout.strip())
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
            assert s.scalars(select(ApiKey)).all() == []


class TestEmbeddedFirstKey:
    def test_first_start_saves_an_admin_key_readable_by_its_owner_only(self, tmp_path: Path) -> None:
        settings = Settings(data_dir=tmp_path / "var")
        upgrade_database(settings)
        cli_module.ensure_local_key(settings)
        path = tmp_path / "var" / "api-key"
        key = path.read_text().strip()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as c:
            assert c.get("/v1/jobs").status_code == 200
        cli_module.ensure_local_key(settings)  # a restart keeps the key
        assert path.read_text().strip() == key
        with session_scope(make_sessionmaker(make_engine(settings))) as s:
            users = s.scalars(select(User)).all()
            assert [(u.name, u.is_admin) for u in users] == [("local", True)]
            assert len(s.scalars(select(ApiKey)).all()) == 1


class TestApiFirstKey:
    """`ddpm-jobs api` without DDPM_BOOTSTRAP_API_KEY (compose with the variable unset)."""

    @pytest.mark.slow
    def test_first_start_prints_one_admin_key_and_later_starts_none(
        self, clean_db: Settings, settings_env: dict[str, str], tmp_path: Path
    ) -> None:
        env = {k: v for k, v in settings_env.items() if k != "DDPM_BOOTSTRAP_API_KEY"}
        log = tmp_path / "api.log"
        with running_api(env, tmp_path) as base:
            printed = re.findall(r"ddpm_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", log.read_text())
            assert len(printed) == 1, log.read_text()
            assert KEY_PATTERN.match(printed[0])
            r = httpx.get(f"{base}/v1/jobs", headers={"Authorization": f"Bearer {printed[0]}"})
            assert r.status_code == 200, r.text
        with running_api(env, tmp_path) as base:
            assert httpx.get(f"{base}/readyz").status_code == 200
        assert "ddpm_" not in log.read_text()  # the second start's log
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
            assert [(u.name, u.is_admin) for u in s.scalars(select(User))] == [("admin", True)]
            assert [k.prefix for k in s.scalars(select(ApiKey))] == [KEY_PATTERN.match(printed[0])["prefix"]]
