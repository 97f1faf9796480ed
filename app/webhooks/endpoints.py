"""Routes for /v1/webhooks: register an endpoint (its signing secret is in this answer only),
list, read and delete them, and list an endpoint's deliveries with their tries."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Query, Response, status

from app.deps import CurrentUser, SessionDep, SettingsDep
from app.jobs.repository import InvalidCursor
from app.openapi import AUTHENTICATED, ErrorOut, error_responses
from app.webhooks import service
from app.webhooks.schemas import DeliveryPage, WebhookCreated, WebhookIn, WebhookOut, WebhookPage

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=AUTHENTICATED)

_WEBHOOK_ID = {"webhook_id": "$response.body#/id"}
_LINKS = {
    "GetWebhook": {"operationId": "get_webhook", "parameters": _WEBHOOK_ID, "description": "The endpoint"},
    "ListDeliveries": {"operationId": "list_deliveries", "parameters": _WEBHOOK_ID, "description": "Its deliveries"},
    "DeleteWebhook": {"operationId": "delete_webhook", "parameters": _WEBHOOK_ID, "description": "Delete it"},
}
Cursor = Annotated[str | None, Query(max_length=512)]


def _bad_cursor(exc: InvalidCursor) -> HTTPException:
    return HTTPException(422, detail=[{"loc": ["query", "cursor"], "msg": str(exc), "type": "value_error"}])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookCreated,
    responses={
        201: {"description": "The endpoint, with its secret (shown this once)", "links": _LINKS},
        **error_responses(400, 422),
        429: {"model": ErrorOut, "description": "Over DDPM_MAX_WEBHOOKS_PER_USER"},
    },
)
def create_webhook(
    body: Annotated[WebhookIn, Body()], user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> WebhookCreated:
    """Register an endpoint for your jobs' events. Each delivery is a POST signed the Standard
    Webhooks way (webhook-id, webhook-timestamp, webhook-signature) with the secret returned here."""
    webhook = service.create_webhook(session, body, user, settings)
    return WebhookCreated(**WebhookOut.of(webhook).model_dump(), secret=webhook.secret)


@router.get("", response_model=WebhookPage, responses=error_responses(422))
def list_webhooks(
    user: CurrentUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Cursor = None,
) -> WebhookPage:
    try:
        webhooks, next_cursor = service.list_webhooks(session, user, limit=limit, cursor=cursor)
    except InvalidCursor as exc:
        raise _bad_cursor(exc) from exc
    return WebhookPage(items=[WebhookOut.of(w) for w in webhooks], next_cursor=next_cursor)


@router.get("/{webhook_id}", response_model=WebhookOut, responses=error_responses(404, 422))
def get_webhook(webhook_id: uuid.UUID, user: CurrentUser, session: SessionDep) -> WebhookOut:
    return WebhookOut.of(service.get_webhook(session, webhook_id, user))


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404, 422))
def delete_webhook(webhook_id: uuid.UUID, user: CurrentUser, session: SessionDep) -> Response:
    """The endpoint and its deliveries; nothing more is sent to it."""
    service.delete_webhook(session, webhook_id, user)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{webhook_id}/deliveries", response_model=DeliveryPage, responses=error_responses(404, 422))
def list_deliveries(
    webhook_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Cursor = None,
) -> DeliveryPage:
    """Newest first, each with its tries (status code or error, seconds); pass `next_cursor` on."""
    try:
        items, next_cursor = service.list_deliveries(session, webhook_id, user, limit=limit, cursor=cursor)
    except InvalidCursor as exc:
        raise _bad_cursor(exc) from exc
    return DeliveryPage(items=items, next_cursor=next_cursor)
