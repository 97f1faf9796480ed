"""Users' data sets, made ready for training: read from an archive or a source, each image
decoded once and checked, written as one prepared set, and decoded arrays cached per size.

No SQL and no Celery here (worker/dataset_task.py ties it to the row). The types below are what
the parts hand each other: sources and archives yield `Member`s (or `Skipped` ones, with the
reason), `prepare` turns them into the prepared set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.config import Settings


class PreparationFailed(Exception):
    """The data set cannot be prepared; the message is the reason a user sees (and can act on)."""


@dataclass(frozen=True)
class Member:
    """One file of a source: its name there (for messages), its size in bytes (as declared), and
    how to read its bytes (called at most once, by the one iterating the members)."""

    name: str
    size: int
    read: Callable[[], bytes]


@dataclass(frozen=True)
class Skipped:
    """A file of a source that is not used, and why ("link", "not an image", "too small (1x1)")."""

    name: str
    reason: str


@dataclass(frozen=True)
class Limits:
    """What preparation accepts (DDPM_MAX_DATASET_BYTES, DDPM_DATASET_MAX_*)."""

    max_source_bytes: int  # a download or an upload
    max_unpacked_bytes: int  # all members of an archive together
    max_ratio: float  # unpacked / packed, for a zip bomb
    max_image_pixels: int  # per image, checked before it is decoded
    min_image_side: int  # narrower or lower images are skipped

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_source_bytes=settings.max_dataset_bytes,
            max_unpacked_bytes=settings.dataset_max_unpacked_bytes,
            max_ratio=settings.dataset_max_ratio,
            max_image_pixels=settings.dataset_max_image_pixels,
            min_image_side=settings.dataset_min_image_side,
        )
