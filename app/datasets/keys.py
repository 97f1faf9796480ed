"""Where a data set's files live in the checkpoint store (keys relative to the checkpoint root).

datasets/<id>/upload.<zip|tar|tar.gz>   the upload, while it arrives and until it is prepared
datasets/<id>/images.tar                the prepared set: the accepted images, in order
datasets/<id>/preview.png               a grid of its first images
datasets/cache/<sha256>/<S>x<S>x<C>.npy the decoded uint8 array (N, C, S, S) a job trains on,
                                        content-addressed by the prepared set's sha256
"""

from __future__ import annotations

import uuid
from typing import Literal

ArchiveFormat = Literal["zip", "tar", "tar.gz"]
ARCHIVE_FORMATS: tuple[ArchiveFormat, ...] = ("zip", "tar", "tar.gz")
CACHE_PREFIX = "datasets/cache/"


def dataset_prefix(dataset_id: uuid.UUID | str) -> str:
    return f"datasets/{dataset_id}/"


def upload_key(dataset_id: uuid.UUID | str, archive_format: ArchiveFormat) -> str:
    return f"{dataset_prefix(dataset_id)}upload.{archive_format}"


def prepared_key(dataset_id: uuid.UUID | str) -> str:
    return f"{dataset_prefix(dataset_id)}images.tar"


def preview_key(dataset_id: uuid.UUID | str) -> str:
    return f"{dataset_prefix(dataset_id)}preview.png"


def cache_key(sha256: str, image_size: int, channels: int) -> str:
    return f"{CACHE_PREFIX}{sha256}/{image_size}x{image_size}x{channels}.npy"
