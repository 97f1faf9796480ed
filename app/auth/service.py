"""The rules for users and API keys: create, revoke, authenticate, bootstrap. Services never commit."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from app.auth.keys import MalformedKey, NewKey, generate_key, hash_key, hashes_match, key_prefix
from app.auth.repository import ApiKeyRepository, UserRepository
from app.models import ApiKey, User, utcnow

# last_used_at is a hint for people auditing keys: written at most once a minute per key.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class InvalidApiKey(Exception):
    """Missing, malformed, unknown or revoked: the client is told no more than that."""


class KeyNotFound(LookupError):
    pass


class KeyConflict(Exception):
    """DDPM_BOOTSTRAP_API_KEY has the prefix of a stored key with another secret."""


@dataclass(frozen=True)
class CreatedKey:
    key: str
    prefix: str
    user: User


def get_or_create_user(session: Session, name: str, *, admin: bool = False) -> User:
    """The named user; created if new. `admin=True` makes an existing user an admin."""
    users = UserRepository(session)
    user = users.get_by_name(name)
    if user is None:
        return users.add(User(name=name, is_admin=admin))
    if admin and not user.is_admin:
        user.is_admin = True
        session.flush()
    return user


def create_key(session: Session, secret_key: str, user_name: str, *, admin: bool = False) -> CreatedKey:
    user = get_or_create_user(session, user_name, admin=admin)
    new = generate_key()
    _store(session, secret_key, user, new)
    return CreatedKey(key=new.key, prefix=new.prefix, user=user)


def _store(session: Session, secret_key: str, user: User, new: NewKey) -> None:
    ApiKeyRepository(session).add(ApiKey(user_id=user.id, prefix=new.prefix, key_hash=hash_key(secret_key, new.key)))


def list_keys(session: Session) -> list[tuple[ApiKey, User]]:
    return ApiKeyRepository(session).list_with_users()


def revoke_key(session: Session, prefix: str) -> ApiKey:
    """Revoke by display prefix; revoking twice keeps the first time."""
    found = ApiKeyRepository(session).get_with_user(prefix.removeprefix("ddpm_").rstrip("_"))
    if found is None:
        raise KeyNotFound(f"no API key with prefix {prefix!r}")
    key = found[0]
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def authenticate(session: Session, secret_key: str, presented: str) -> User:
    """The user a presented key belongs to; InvalidApiKey when it opens nothing."""
    digest = hash_key(secret_key, presented)  # computed for every key, found or not
    try:
        prefix = key_prefix(presented)
    except MalformedKey as exc:
        raise InvalidApiKey("malformed API key") from exc
    repo = ApiKeyRepository(session)
    found = repo.get_with_user(prefix)
    if found is None or not hashes_match(found[0].key_hash, digest) or found[0].revoked_at is not None:
        raise InvalidApiKey("unknown or revoked API key")
    key, user = found
    now = utcnow()
    if key.last_used_at is None or key.last_used_at < now - LAST_USED_RESOLUTION:
        repo.touch(key.id, now, not_since=now - LAST_USED_RESOLUTION)
    return user


def active_key_prefixes(session: Session, prefixes: Collection[str]) -> set[str]:
    """Which of these keys (by prefix) still open requests. Long-lived responses (event streams)
    ask this every few seconds and end once their key is revoked."""
    return ApiKeyRepository(session).unrevoked_prefixes(prefixes) if prefixes else set()


def ensure_bootstrap_key(session: Session, secret_key: str, key: str, user_name: str = "admin") -> bool:
    """Make `key` an admin key of `user_name` unless it is stored already; True if created.

    A revoked bootstrap key stays revoked: revocation is deliberate, a restart is not.
    """
    prefix = key_prefix(key)
    found = ApiKeyRepository(session).get_with_user(prefix)
    if found is not None:
        if not hashes_match(found[0].key_hash, hash_key(secret_key, key)):
            raise KeyConflict(
                f"DDPM_BOOTSTRAP_API_KEY has prefix {prefix}, which another stored key uses "
                "(or DDPM_SECRET_KEY changed); generate a new bootstrap key"
            )
        if not found[1].is_admin:
            found[1].is_admin = True
            session.flush()
        return False
    user = get_or_create_user(session, user_name, admin=True)
    _store(session, secret_key, user, NewKey(key=key, prefix=prefix))
    return True


def has_any_key(session: Session) -> bool:
    return ApiKeyRepository(session).count() > 0


def create_first_admin_key(session: Session, secret_key: str, user_name: str) -> CreatedKey | None:
    """A first start: an admin key for `user_name` when no key exists at all; None otherwise."""
    if has_any_key(session):
        return None
    return create_key(session, secret_key, user_name, admin=True)
