"""Every query on webhooks, their deliveries and attempts. Nothing here commits.

`owner_id` scopes the API's queries to one user's endpoints (None: every user's, for an admin).
The sender's side (due, lock, record) addresses deliveries by id; its lock is a conditional
update, so two senders never try one delivery at once (PostgreSQL also skips rows another
sender has locked while it chooses; SQLite has one writer at a time anyway).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.jobs.repository import decode_cursor, encode_cursor
from app.models import Webhook, WebhookAttempt, WebhookDelivery


def _newest_first(stmt: Any, model: Any, cursor: str | None, limit: int) -> Any:
    """`stmt` ordered newest first after the cursor's position (created_at, id), one row more than a page."""
    stmt = stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    if cursor is not None:
        created, row_id = decode_cursor(cursor)
        stmt = stmt.where(or_(model.created_at < created, and_(model.created_at == created, model.id < row_id)))
    return stmt


def _page(rows: list[Any], limit: int) -> tuple[list[Any], str | None]:
    if len(rows) > limit:
        return rows[:limit], encode_cursor(rows[limit - 1])
    return rows, None


class WebhookRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    # --- endpoints ------------------------------------------------------------------------
    def add(self, webhook: Webhook) -> Webhook:
        self.session.add(webhook)
        self.session.flush()
        return webhook

    def get(self, webhook_id: uuid.UUID, *, owner_id: uuid.UUID | None) -> Webhook | None:
        stmt = select(Webhook).where(Webhook.id == webhook_id)
        if owner_id is not None:
            stmt = stmt.where(Webhook.owner_id == owner_id)
        return self.session.scalars(stmt).one_or_none()

    def count(self, owner_id: uuid.UUID) -> int:
        return self.session.scalar(select(func.count()).where(Webhook.owner_id == owner_id)) or 0

    def list_page(
        self, *, owner_id: uuid.UUID | None, limit: int, cursor: str | None
    ) -> tuple[list[Webhook], str | None]:
        stmt = select(Webhook)
        if owner_id is not None:
            stmt = stmt.where(Webhook.owner_id == owner_id)
        return _page(list(self.session.scalars(_newest_first(stmt, Webhook, cursor, limit))), limit)

    def of_owner(self, owner_id: uuid.UUID) -> list[Webhook]:
        return list(self.session.scalars(select(Webhook).where(Webhook.owner_id == owner_id)))

    def delete(self, webhook: Webhook) -> None:
        self.session.delete(webhook)  # its deliveries and their attempts go with it (ON DELETE CASCADE)
        self.session.flush()

    # --- deliveries -----------------------------------------------------------------------
    def insert_delivery(self, values: dict[str, Any]) -> None:
        """One delivery, unless the endpoint already has one for the event's key (a re-done event)."""
        dialect = self.session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = insert(WebhookDelivery).values(**values)
        self.session.execute(stmt.on_conflict_do_nothing(index_elements=["webhook_id", "event_key"]))

    def deliveries_page(
        self, webhook_id: uuid.UUID, *, limit: int, cursor: str | None
    ) -> tuple[list[WebhookDelivery], str | None]:
        stmt = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
        return _page(list(self.session.scalars(_newest_first(stmt, WebhookDelivery, cursor, limit))), limit)

    def attempts_of(self, delivery_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[WebhookAttempt]]:
        found: dict[uuid.UUID, list[WebhookAttempt]] = {d: [] for d in delivery_ids}
        stmt = select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(delivery_ids))
        for attempt in self.session.scalars(stmt.order_by(WebhookAttempt.number)):
            found[attempt.delivery_id].append(attempt)
        return found

    # --- the sender's side ----------------------------------------------------------------
    def due(self, now: datetime, limit: int) -> list[uuid.UUID]:
        """Pending deliveries whose time has come and that no live sender holds, oldest first."""
        stmt = (
            select(WebhookDelivery.id)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .where(or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now))
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return list(self.session.scalars(stmt))

    def lock(self, delivery_id: uuid.UUID, now: datetime, until: datetime) -> bool:
        """Hold the delivery until `until` (this sender's token); False when another sender holds it."""
        result = self.session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending")
            .where(or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now))
            .values(locked_until=until)
        )
        return result.rowcount == 1

    def held(self, delivery_id: uuid.UUID, until: datetime) -> tuple[WebhookDelivery, Webhook] | None:
        """The delivery and its endpoint while this sender's hold (`until`) is still on it."""
        stmt = (
            select(WebhookDelivery, Webhook)
            .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.locked_until == until)
            .where(WebhookDelivery.status == "pending")
        )
        row = self.session.execute(stmt).one_or_none()
        return None if row is None else (row[0], row[1])

    def record_try(self, attempt: WebhookAttempt, until: datetime, **values: object) -> bool:
        """The try and the delivery's new state (released), only while this sender's hold is on
        it; False when it is not (deleted, or the hold ran out and another sender took it)."""
        result = self.session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == attempt.delivery_id, WebhookDelivery.locked_until == until)
            .values(locked_until=None, attempts=attempt.number, **values)
        )
        if result.rowcount != 1:
            return False
        self.session.add(attempt)
        return True
