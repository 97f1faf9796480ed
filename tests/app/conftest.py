from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.conftest import ApiUser, MakeUser


@pytest.fixture
def alice(make_user: MakeUser) -> ApiUser:
    return make_user("alice")


@pytest.fixture
def client(clean_db: Settings, alice: ApiUser) -> Iterator[TestClient]:
    """A client that sends alice's API key with every request."""
    with TestClient(create_app(clean_db), headers=alice.headers) as c:
        yield c
