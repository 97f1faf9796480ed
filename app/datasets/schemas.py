"""Data sets as the API shows them, and the JSON body that names a source instead of uploading.

A source URI's form is checked here (scheme, no userinfo, no NUL or control character, length,
the hf id); what depends on the service's configuration (S3 storage, private addresses) is
checked by the service (app/datasets/service.py::check_source).
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.models import Dataset

MAX_SOURCE_LENGTH = 2048
SCHEMES = ("s3", "https", "hf")
# hf://<namespace>/<name>: what the Hub allows in a repository id; never `.` or `..` alone.
_HF_ID = re.compile(r"hf://([\w.-]{1,96})/([\w.-]{1,96})", re.ASCII)
_HF_SPLIT = re.compile(r"[\w.:%+\[\]-]{1,100}", re.ASCII)  # train, test, train[:10%]
# What S3 allows in a bucket name (path-style endpoints included).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")  # NUL, other controls, and spaces: never in a URI


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str | None
    status: str = Field(description="uploading | preparing | ready | failed")
    source: str = Field(description='"upload", or the URI the data set is read from')
    split: str | None = Field(None, description="hf:// sources: the split read")
    format: str | None = Field(None, description="Uploads: zip, tar or tar.gz")
    received_bytes: int = Field(description="Uploads: bytes stored so far (the offset a PATCH continues from)")
    upload_length: int | None = Field(None, description="Uploads: the size declared with Upload-Length")
    size_bytes: int = Field(description="Storage counted against your quota")
    archive_sha256: str | None = Field(None, description="Uploads: sha256 of the whole archive, once complete")
    sha256: str | None = Field(None, description="sha256 of the prepared image set, once ready")
    image_count: int | None
    skipped: int | None = Field(None, description="Files of the source that are not usable images")
    summary: dict[str, Any] | None = Field(
        None, description="Image sizes and modes, why files were skipped (with examples), bytes read, seconds taken"
    )
    error: str | None = Field(None, description="Why preparation failed")
    preview_url: str | None = Field(None, description="A grid of the first images (once ready)")
    created_at: datetime
    updated_at: datetime
    prepared_at: datetime | None

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetOut:
        fields = {name: getattr(dataset, name) for name in cls.model_fields if hasattr(Dataset, name)}
        ready = dataset.status == "ready" and dataset.preview_key is not None
        return cls.model_validate(
            {
                **fields,
                "format": dataset.archive_format,
                "preview_url": f"/v1/datasets/{dataset.id}/preview.png" if ready else None,
            }
        )


class DatasetPage(BaseModel):
    items: list[DatasetOut]
    next_cursor: str | None


class DatasetSourceIn(BaseModel):
    """A data set read by a worker from where it already is (no upload)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        max_length=MAX_SOURCE_LENGTH,
        description="s3://bucket/prefix/ (this service's S3 storage), https://host/images.zip|.tar|.tar.gz "
        "or hf://namespace/name (a Hugging Face data set)",
        examples=["hf://ylecun/mnist"],
    )
    split: str | None = Field(None, max_length=100, description="hf:// only: the split (default `train`)")
    name: str | None = Field(None, max_length=200)

    @field_validator("source")
    @classmethod
    def _well_formed(cls, source: str) -> str:
        source_form(source)
        return source

    @field_validator("name")
    @classmethod
    def _no_nul(cls, name: str | None) -> str | None:
        if name is not None and "\0" in name:
            raise ValueError("must not contain a NUL character")
        return name

    @model_validator(mode="after")
    def _split_for_hf(self) -> DatasetSourceIn:
        if not self.source.startswith("hf://"):
            if self.split is not None:
                raise ValueError("split is only valid for hf:// sources")
            return self
        if self.split is None:
            self.split = "train"
        elif not _HF_SPLIT.fullmatch(self.split):
            raise ValueError(f"split {self.split[:100]!r} is not a split name (e.g. train, test, train[:10%])")
        return self


def source_form(source: str) -> SplitResult:
    """The URI, split; ValueError naming what is wrong with its form."""
    if _CONTROL.search(source):
        raise ValueError("must not contain spaces, NUL or other control characters")
    if not source.isascii():
        raise ValueError("must be ASCII (percent-encode other characters)")
    try:
        parts = urlsplit(source)
        port = parts.port  # ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"is not a valid URI ({exc})") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(f"must start with s3://, https:// or hf://, not {source[:40]!r}")
    if "@" in parts.netloc:
        raise ValueError("must not carry credentials (user:password@)")
    if parts.scheme == "hf":
        if not _HF_ID.fullmatch(source) or any(set(part) <= {"."} for part in source[5:].split("/")):
            raise ValueError("must be hf://<namespace>/<name> (letters, digits, _ . -)")
    elif parts.scheme == "s3":
        if not _BUCKET.fullmatch(parts.netloc) or parts.query or parts.fragment:
            raise ValueError("must be s3://<bucket>/<prefix>/ with a valid bucket name and no ?query or #fragment")
    elif not parts.hostname or (port is not None and port == 0):
        raise ValueError("must name a host: https://host/path/images.zip")
    return parts
