"""Every query on users and API keys. Nothing here commits: the caller's unit of work does."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.models import ApiKey, User


class UserRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get_by_name(self, name: str) -> User | None:
        return self.session.scalars(select(User).where(User.name == name)).one_or_none()

    def add(self, user: User) -> User:
        self.session.add(user)
        self.session.flush()
        return user

    def list(self) -> list[User]:
        """Every user, by name."""
        return list(self.session.scalars(select(User).order_by(User.name)))

    def lock(self, user_id: uuid.UUID) -> None:
        """Serialise one user's job submissions (the quota count and the insert) on PostgreSQL."""
        self.session.execute(select(User.id).where(User.id == user_id).with_for_update())


class ApiKeyRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get_with_user(self, prefix: str) -> tuple[ApiKey, User] | None:
        row = self.session.execute(
            select(ApiKey, User).join(User, User.id == ApiKey.user_id).where(ApiKey.prefix == prefix)
        ).one_or_none()
        return None if row is None else (row[0], row[1])

    def unrevoked_prefixes(self, prefixes: Collection[str]) -> set[str]:
        """Those of `prefixes` whose key exists and is not revoked."""
        stmt = select(ApiKey.prefix).where(ApiKey.prefix.in_(prefixes), ApiKey.revoked_at.is_(None))
        return set(self.session.scalars(stmt))

    def add(self, key: ApiKey) -> ApiKey:
        self.session.add(key)
        self.session.flush()
        return key

    def list_with_users(self) -> list[tuple[ApiKey, User]]:
        rows = self.session.execute(
            select(ApiKey, User).join(User, User.id == ApiKey.user_id).order_by(User.name, ApiKey.created_at)
        )
        return [(k, u) for k, u in rows]

    def count(self) -> int:
        return self.session.scalar(select(func.count()).select_from(ApiKey)) or 0

    def touch(self, key_id: uuid.UUID, now: datetime, not_since: datetime) -> None:
        """Record a use, unless one was recorded after `not_since` (keeps reads from writing)."""
        self.session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < not_since))
            .values(last_used_at=now)
        )
