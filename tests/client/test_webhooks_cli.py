"""`ddpm webhooks add / list / delete / deliveries` against the real app (PostgreSQL), in-process."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.client.test_cli import assert_clean_error, ddpm, use_transport
from tests.conftest import MakeUser


@pytest.fixture
def key(clean_db: Settings, make_user: MakeUser, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CLI's requests go to the real app through a TestClient; returns alice's key."""
    alice = make_user("alice")
    app_client = TestClient(create_app(clean_db))

    def handler(request: httpx.Request) -> httpx.Response:
        answer = app_client.request(
            request.method,
            str(request.url.copy_with(scheme=None, host=None, port=None)),
            content=request.content,
            headers=dict(request.headers),
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    use_transport(monkeypatch, handler)
    return alice.key


def test_add_list_deliveries_delete(key: str) -> None:
    added = ddpm(None, key, "webhooks", "add", "https://hooks.example.com/x", "--event", "job.succeeded")
    assert added.exit_code == 0, added.output
    webhook_id, secret = added.stdout.split()
    assert secret.startswith("whsec_") and "not shown again" in added.stderr
    listed = json.loads(ddpm(None, key, "webhooks", "list", "--json").stdout)
    assert [(w["id"], w["events"]) for w in listed] == [(webhook_id, ["job.succeeded"])]
    assert webhook_id in ddpm(None, key, "webhooks", "list").stdout
    assert json.loads(ddpm(None, key, "webhooks", "deliveries", webhook_id, "--json").stdout) == []
    assert ddpm(None, key, "webhooks", "deliveries", webhook_id).exit_code == 0
    assert ddpm(None, key, "webhooks", "delete", webhook_id).exit_code == 0
    assert_clean_error(ddpm(None, key, "webhooks", "deliveries", webhook_id), "404")


def test_a_refused_url_is_a_clean_error_naming_it(key: str) -> None:
    assert_clean_error(ddpm(None, key, "webhooks", "add", "http://127.0.0.1/x"), "url:", "DDPM_WEBHOOK_ALLOW_PRIVATE")
