"""The connection pool (app/db.py): its size comes from the settings, and a request that finds
no free connection in time is a 503 the client may retry, not a 500."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import POOL_RETRY_AFTER_S, create_app
from tests.conftest import ApiUser


class TestPoolExhausted:
    def test_is_503_with_retry_after_until_a_connection_is_free(self, clean_db: Settings, alice: ApiUser) -> None:
        settings = clean_db.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout_s": 0.2})
        app = create_app(settings)
        with TestClient(app, headers=alice.headers) as client:
            with app.state.engine.connect():  # the pool's only connection, held
                r = client.get("/v1/jobs")
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] == str(POOL_RETRY_AFTER_S)
                assert "retry" in r.json()["detail"]
            assert client.get("/v1/jobs").status_code == 200
