"""GET /metrics for Prometheus: an admin API key, or `Authorization: Bearer $DDPM_METRICS_TOKEN`
(the scraper's, which opens nothing else). Not in the OpenAPI document: it is for operators."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client.exposition import choose_encoder

from app.config import Settings
from app.db import session_scope
from app.deps import SettingsDep, bearer_scheme, current_user
from app.monitoring.collector import DatabaseCollector
from app.monitoring.process import scrape_registry

router = APIRouter(tags=["monitoring"], include_in_schema=False)


def metrics_reader(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """The scraper's token or an admin's key; 401 for no or an unknown key, 403 for a user's."""
    if credentials is not None and is_metrics_token(settings, credentials.credentials):
        return
    user = current_user(request, credentials)  # 401 when missing, unknown or revoked
    if not user.is_admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="GET /metrics needs an admin API key or the DDPM_METRICS_TOKEN bearer token",
        )


def is_metrics_token(settings: Settings, presented: str) -> bool:
    token = settings.metrics_token.get_secret_value()
    return bool(token) and hmac.compare_digest(presented.encode(), token.encode())


@router.get("/metrics", dependencies=[Depends(metrics_reader)])
def metrics(request: Request) -> Response:
    """This host's API-process metrics and the database's, in the format the scraper asks for
    (OpenMetrics or Prometheus text). The database is read in one short session."""
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    registry = scrape_registry()
    with session_scope(request.app.state.sessionmaker) as session:
        registry.register(DatabaseCollector(session))
        body = encode(registry)
    return Response(body, media_type=content_type)
