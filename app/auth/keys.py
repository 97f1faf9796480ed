"""API key format and hashing. A key is shown once; the database keeps its prefix and its HMAC.

    ddpm_<prefix: 8 hex chars>_<secret: 43 chars of secrets.token_urlsafe(32), 256 bits>

The prefix finds the row (and names the key in listings); the stored hash is
HMAC-SHA256(secret_key, whole key), compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

KEY_PATTERN = re.compile(r"^ddpm_(?P<prefix>[0-9a-f]{8})_(?P<secret>[A-Za-z0-9_-]{43})$")


class MalformedKey(ValueError):
    pass


@dataclass(frozen=True)
class NewKey:
    key: str  # the whole key: shown once, never stored
    prefix: str


def generate_key() -> NewKey:
    prefix = secrets.token_hex(4)
    return NewKey(key=f"ddpm_{prefix}_{secrets.token_urlsafe(32)}", prefix=prefix)


def key_prefix(key: str) -> str:
    """The display and lookup prefix of a well-formed key; MalformedKey otherwise."""
    match = KEY_PATTERN.match(key)
    if match is None:
        raise MalformedKey("an API key looks like ddpm_<8 hex chars>_<43 characters>; make one with `ddpm-jobs keys`")
    return match["prefix"]


def hash_key(secret_key: str, key: str) -> str:
    return hmac.new(secret_key.encode(), key.encode(), hashlib.sha256).hexdigest()


def hashes_match(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
