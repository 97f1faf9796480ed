from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app


@pytest.fixture
def client(clean_db: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(clean_db)) as c:
        yield c
