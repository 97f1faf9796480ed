"""Typed dependencies: routes read like their signatures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth.service import InvalidApiKey, authenticate
from app.checkpoints.schemas import checkpoint_ref
from app.config import Settings
from app.db import session_scope
from app.models import MAX_STEP, User
from app.queue import Dispatcher

# Declares the scheme in the OpenAPI document; the check itself is `current_user`.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer ddpm_…`.")


def get_session(request: Request) -> Iterator[Session]:
    """The request's unit of work: committed after the route returns and before the response is
    sent (scope="function" below), so a client is answered only once its writes are committed,
    and tasks sent after the commit (app/queue.py) are on the broker by then. Rolled back on error."""
    with session_scope(request.app.state.sessionmaker) as session:
        yield session


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
# A training step in a path (/samples/{step}.png): what the database's integer holds.
StepPath = Annotated[int, Path(ge=0, le=MAX_STEP)]


# A checkpoint in a path (/checkpoints/{step}, /checkpoints/{step}/export): a step, `latest` for
# the newest, or `best` for the lowest FID; every such route resolves it with
# app.checkpoints.endpoints.checkpoint_or_404.
CheckpointStepPath = Annotated[
    checkpoint_ref(strict=False),
    Path(description="A checkpoint's step, `latest` for the newest, or `best` for the lowest FID"),
]


def current_user(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> User:
    """The owner of the request's API key; 401 when the key is missing, malformed, unknown or revoked.

    Checked in its own short transaction, so the key's use is recorded whatever the route does.
    """
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing API key: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    settings: Settings = request.app.state.settings
    try:
        with session_scope(request.app.state.sessionmaker) as session:
            return authenticate(session, settings.secret_key, credentials.credentials)
    except InvalidApiKey as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=f"{exc}: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        ) from exc


CurrentUser = Annotated[User, Depends(current_user)]
