"""Webhook endpoints and their deliveries as the API takes and shows them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, UrlConstraints, field_validator

from app.models import WEBHOOK_EVENTS, Webhook, WebhookAttempt, WebhookDelivery

WebhookEvent = Literal[WEBHOOK_EVENTS]  # type: ignore[valid-type]
WebhookUrl = Annotated[AnyHttpUrl, UrlConstraints(max_length=2048, allowed_schemes=["http", "https"])]


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl = Field(
        description="Where events are POSTed: http(s), no user name or password, at most 2048 characters. "
        "Loopback, private and link-local hosts are refused unless DDPM_WEBHOOK_ALLOW_PRIVATE."
    )
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS),
        min_length=1,
        max_length=len(WEBHOOK_EVENTS),
        description="The events to deliver (default: every one).",
    )

    @field_validator("url", mode="after")
    @classmethod
    def _no_userinfo(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        if url.username or url.password:
            raise ValueError("a webhook URL may not carry a user name or password")
        return url

    @field_validator("events", mode="after")
    @classmethod
    def _in_order(cls, events: list[str]) -> list[str]:
        return [e for e in WEBHOOK_EVENTS if e in events]  # each once, in a fixed order


class WebhookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    url: str
    events: list[str]
    created_at: datetime

    @classmethod
    def of(cls, webhook: Webhook) -> WebhookOut:
        return cls.model_validate(webhook)


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="The signing secret (whsec_…): shown this once only. Verify each delivery's "
        "webhook-signature with it (Standard Webhooks)."
    )


class WebhookAttemptOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    number: int
    at: datetime
    status_code: int | None = Field(description="The receiver's answer; null when there was none")
    error: str | None = Field(description="Why the try failed (no answer, a refused address, a non-2xx status)")
    seconds: float


class DeliveryOut(BaseModel):
    id: uuid.UUID = Field(description="The webhook-id header of every try")
    event: str
    job_id: uuid.UUID | None
    status: Literal["pending", "succeeded", "failed"]
    payload: dict[str, Any]
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="While pending: when it is tried next")
    delivered_at: datetime | None
    attempts: list[WebhookAttemptOut]

    @classmethod
    def of(cls, delivery: WebhookDelivery, attempts: list[WebhookAttempt]) -> DeliveryOut:
        return cls(
            id=delivery.id,
            event=delivery.event,
            job_id=delivery.job_id,
            status=delivery.status,  # type: ignore[arg-type]
            payload=delivery.payload,
            created_at=delivery.created_at,
            next_attempt_at=delivery.next_attempt_at if delivery.status == "pending" else None,
            delivered_at=delivery.delivered_at,
            attempts=[WebhookAttemptOut.model_validate(a) for a in attempts],
        )


class WebhookPage(BaseModel):
    items: list[WebhookOut]
    next_cursor: str | None


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None
