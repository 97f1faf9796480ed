"""The rules for data sets: who sees one (its owner, or an admin; another user's does not exist:
DatasetNotFound, a 404), the limits (one upload's size: 413; one user's storage and count: 429),
the upload's life (uploading -> preparing once complete, the prepare task sent after commit), a
source URI's checks, and deletion (409 while a queued or running job trains on it).

Services never commit: the caller's unit of work does (a request's SessionDep, or the short
`session_scope`s of the streaming upload routes, which hold no connection while bytes flow).
Files are removed by the caller after the commit that forgot them (`delete_dataset` returns keys).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from app.auth.repository import UserRepository
from app.checkpoints.store import CheckpointFileError, CheckpointStore, StorageUnavailable
from app.config import Settings
from app.datasets.keys import CACHE_PREFIX, ArchiveFormat, upload_key
from app.datasets.repository import DatasetRepository
from app.datasets.schemas import DatasetSourceIn, source_form
from app.jobs.limits import SpecRefused
from app.jobs.service import QuotaExceeded, visible_owner
from app.models import Dataset, User
from app.net import private_host
from app.queue import Sender, Task, send_after_commit

log = logging.getLogger(__name__)


class DatasetNotFound(LookupError):
    def __init__(self, dataset_id: uuid.UUID) -> None:
        super().__init__(f"data set {dataset_id} not found")


class DatasetConflict(Exception):
    """The data set's state does not allow the request (409); `offset` is the upload's true
    offset when that is what differs (sent back as `Upload-Offset`)."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


class DatasetTooLarge(Exception):
    """An upload over DDPM_MAX_DATASET_BYTES (or its own declared Upload-Length): 413."""


@dataclass(frozen=True)
class Allowance:
    """How many bytes an upload may hold in all: its own limit (413 past it) and the room left
    in its owner's quota (429 past it), with the figures the 429 names."""

    limit: int
    limit_reason: str
    quota_room: int
    quota: int
    used_by_others: int

    def check(self, total: int) -> None:
        if total > self.limit:
            raise DatasetTooLarge(f"the upload is over {self.limit} bytes, {self.limit_reason}")
        if total > self.quota_room:
            raise QuotaExceeded(
                f"your data sets take {self.used_by_others} bytes of your {self.quota}-byte storage quota "
                f"(DDPM_DATASET_QUOTA_BYTES): this upload, at {total} bytes, does not fit; delete a data set"
            )


# --- who sees a data set ------------------------------------------------------------------------
def get_dataset(session: Session, dataset_id: uuid.UUID, user: User, *, for_update: bool = False) -> Dataset:
    dataset = DatasetRepository(session).get(dataset_id, owner_id=visible_owner(user), for_update=for_update)
    if dataset is None:
        raise DatasetNotFound(dataset_id)
    return dataset


def list_datasets(
    session: Session, user: User, *, limit: int, status: str | None, cursor: str | None
) -> tuple[list[Dataset], str | None]:
    """The user's data sets (an admin's: everyone's), newest first. InvalidCursor for a bad cursor."""
    return DatasetRepository(session).list_page(owner_id=visible_owner(user), limit=limit, status=status, cursor=cursor)


# --- limits ---------------------------------------------------------------------------------------
def _check_count(repo: DatasetRepository, owner: User, settings: Settings) -> int:
    """The bytes the owner's data sets take; QuotaExceeded when they hold as many as allowed."""
    count, size = repo.usage(owner.id)
    if count >= settings.max_datasets_per_user:
        raise QuotaExceeded(
            f"you have {count} data sets, the most this service allows per user "
            f"(DDPM_MAX_DATASETS_PER_USER={settings.max_datasets_per_user}); delete one first"
        )
    return size


def allowance(settings: Settings, used_by_others: int, upload_length: int | None) -> Allowance:
    limit, reason = settings.max_dataset_bytes, "the most this service accepts (DDPM_MAX_DATASET_BYTES)"
    if upload_length is not None and upload_length < limit:
        limit, reason = upload_length, "its declared Upload-Length"
    quota = settings.dataset_quota_bytes
    return Allowance(limit, reason, quota - used_by_others, quota, used_by_others)


def start_upload(
    session: Session,
    owner: User,
    settings: Settings,
    *,
    name: str | None,
    archive_format: ArchiveFormat,
    upload_length: int | None,
    expected_bytes: int | None,
) -> tuple[Dataset, Allowance]:
    """A new `uploading` data set for `owner` and what it may hold. `expected_bytes` (the
    declared length, or the body's Content-Length when it is the whole archive) is checked now:
    DatasetTooLarge (413) or QuotaExceeded (429) before a byte is read."""
    repo = DatasetRepository(session)
    UserRepository(session).lock(owner.id)  # the quota's count and the insert agree
    used = _check_count(repo, owner, settings)
    allowed = allowance(settings, used, upload_length)
    if expected_bytes is not None:
        allowed.check(expected_bytes)
    dataset = Dataset(owner_id=owner.id, name=name, status="uploading", source="upload", archive_format=archive_format)
    dataset.id = uuid.uuid4()
    dataset.archive_key = upload_key(dataset.id, archive_format)
    dataset.received_bytes, dataset.size_bytes, dataset.upload_length = 0, 0, upload_length
    return repo.add(dataset), allowed


def resume_upload(session: Session, dataset_id: uuid.UUID, user: User, settings: Settings) -> tuple[Dataset, Allowance]:
    """An `uploading` data set of the user's and what it may hold in all (409 otherwise)."""
    dataset = get_dataset(session, dataset_id, user)
    if dataset.status != "uploading":
        raise DatasetConflict(f"data set {dataset_id} is {dataset.status}: only an uploading data set takes more bytes")
    _, used = DatasetRepository(session).usage(dataset.owner_id)
    return dataset, allowance(settings, used - dataset.size_bytes, dataset.upload_length)


def record_progress(session: Session, dataset_id: uuid.UUID, received: int) -> bool:
    """The upload's bytes so far (also its storage, and the sign it is alive for the sweeper);
    False when the data set is gone or no longer uploading."""
    dataset = DatasetRepository(session).get(dataset_id, for_update=True)
    if dataset is None or dataset.status != "uploading":
        return False
    DatasetRepository(session).update(dataset_id, received_bytes=received, size_bytes=received)
    return True


def complete_upload(
    session: Session,
    dispatcher: Sender | None,
    dataset_id: uuid.UUID,
    received: int,
    sha256: str,
    name: str | None = None,
) -> Dataset:
    """uploading -> preparing, with the whole archive's size and sha256 (and the name a form
    sent after its file); the prepare task goes out once the session commits. DatasetConflict
    when it is no longer uploading (deleted, or completed by another request)."""
    repo = DatasetRepository(session)
    dataset = repo.get(dataset_id, for_update=True)
    if dataset is None or dataset.status != "uploading":
        raise DatasetConflict(f"data set {dataset_id} was deleted or completed while its bytes arrived")
    named = {"name": name} if name is not None else {}
    values = {"received_bytes": received, "size_bytes": received, "archive_sha256": sha256, **named}
    repo.update(dataset_id, status="preparing", **values)
    session.refresh(dataset)
    if dispatcher is not None:
        send_after_commit(session, dispatcher, Task.prepare(dataset_id))
    return dataset


def dataset_by_id(session: Session, dataset_id: uuid.UUID) -> Dataset:
    """A data set this request already holds (its owner was checked when it was found)."""
    dataset = DatasetRepository(session).get(dataset_id)
    if dataset is None:
        raise DatasetNotFound(dataset_id)
    return dataset


def discard_upload(session: Session, dataset_id: uuid.UUID) -> str | None:
    """An upload refused mid-way (too large, over quota): its row goes; returns the key of its
    bytes, for the caller to remove after the commit. Only an `uploading` row is removed."""
    repo = DatasetRepository(session)
    dataset = repo.get(dataset_id, for_update=True)
    if dataset is None or dataset.status != "uploading":
        return None
    key = dataset.archive_key
    repo.delete(dataset)
    return key


# --- sources ----------------------------------------------------------------------------------
def check_source(source: str, settings: Settings) -> None:
    """What the source's form cannot say: s3:// needs this service's S3 storage; an https host
    must not be a literal loopback, private, link-local or reserved address (or `localhost`)
    unless DDPM_DATASET_URL_ALLOW_PRIVATE. SpecRefused (422 on body.source) otherwise."""
    parts = source_form(source)
    refused = SpecRefused()
    if parts.scheme == "s3" and settings.storage != "s3":
        refused.add(("source",), "s3:// sources need this service's S3 storage (DDPM_STORAGE=s3)", source)
    elif parts.scheme == "s3" and _own_storage(parts.netloc, parts.path.lstrip("/"), settings):
        refused.add(("source",), "this is where the service keeps its own files: name another bucket or prefix", source)
    elif parts.scheme == "https" and not settings.dataset_url_allow_private and private_host(parts.hostname or ""):
        refused.add(
            ("source",),
            f"host {parts.hostname!r} is a loopback, private, link-local or reserved address: refused "
            "(DDPM_DATASET_URL_ALLOW_PRIVATE allows it)",
            source,
        )
    if refused.errors:
        raise refused


def _own_storage(bucket: str, prefix: str, settings: Settings) -> bool:
    """The service's own bucket and prefix (every user's checkpoints and data sets), as the
    worker judges it (worker/datasets/sources.py), refused here before a row is made."""
    own = settings.s3_prefix.strip("/")
    own = f"{own}/" if own else ""
    return bucket == settings.s3_bucket and (prefix.startswith(own) or own.startswith(prefix))


def create_from_source(
    session: Session, dispatcher: Sender | None, owner: User, settings: Settings, body: DatasetSourceIn
) -> Dataset:
    """A `preparing` data set read by a worker from `body.source`; the task goes out after commit."""
    check_source(body.source, settings)
    repo = DatasetRepository(session)
    UserRepository(session).lock(owner.id)
    _check_count(repo, owner, settings)
    dataset = repo.add(
        Dataset(
            owner_id=owner.id,
            name=body.name,
            status="preparing",
            source=body.source,
            split=body.split,
            received_bytes=0,
            size_bytes=0,
        )
    )
    if dispatcher is not None:
        send_after_commit(session, dispatcher, Task.prepare(dataset.id))
    return dataset


# --- the sweeper's side -------------------------------------------------------------------------
def expire_stale_uploads(session: Session, idle_since: datetime) -> list[str]:
    """Uploads broken off and not resumed since `idle_since`: their rows go (re-checked under a
    row lock, so a PATCH that just recorded progress keeps its upload); returns the keys of
    their bytes, to remove once this commits."""
    repo = DatasetRepository(session)
    keys = []
    for stale in repo.stale_uploads(idle_since):
        dataset = repo.get(stale.id, for_update=True)
        if dataset is None or dataset.status != "uploading" or dataset.updated_at >= idle_since:
            continue
        if dataset.archive_key:
            keys.append(dataset.archive_key)
        repo.delete(dataset)
    return keys


# --- deletion -----------------------------------------------------------------------------------
def delete_dataset(session: Session, dataset_id: uuid.UUID, user: User) -> list[str]:
    """Forget the data set; returns the keys (and key prefixes, ending in /) of its files, to
    remove once this commits. DatasetConflict (409) naming the queued or running jobs on it."""
    repo = DatasetRepository(session)
    dataset = get_dataset(session, dataset_id, user, for_update=True)
    jobs = repo.jobs_using(dataset_id)
    if jobs:
        named = ", ".join(str(j) for j in jobs[:10]) + (f" and {len(jobs) - 10} more" if len(jobs) > 10 else "")
        raise DatasetConflict(
            f"data set {dataset_id} is used by {len(jobs)} queued or running job(s): {named}; "
            "cancel them or wait until they end"
        )
    keys = [k for k in (dataset.archive_key, dataset.prepared_key, dataset.preview_key) if k]
    if dataset.sha256 and not repo.shares_content(dataset.sha256, dataset_id):
        keys.append(f"{CACHE_PREFIX}{dataset.sha256}/")
    repo.delete(dataset)
    return keys


def remove_files(store: CheckpointStore, keys: list[str]) -> None:
    """Remove files no row names any more (keys, or prefixes ending in /), and the data set's
    folder once empty. A failure is logged, not raised: the row is already gone."""
    for key in keys:
        try:
            for each in sorted(store.keys_under(key)) if key.endswith("/") else [key]:
                store.delete(each)
        except (StorageUnavailable, CheckpointFileError, OSError) as exc:
            log.warning("could not remove data set file(s) %s: %s", key, exc)
            continue
        top = store.root / "datasets"
        folder = store.resolve(key.rstrip("/")).parent if not key.endswith("/") else store.resolve(key)
        while folder.is_relative_to(top) and folder != top:
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone)
                break
            folder = folder.parent
