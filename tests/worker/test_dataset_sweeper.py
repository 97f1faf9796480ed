"""The sweeper's data set passes against the test PostgreSQL: broken-off uploads expire (row and
bytes), preparations whose worker died are freed and sent again, and preparations never sent (or
sent long ago and never taken) are sent, once."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.checkpoints.store import LocalStore
from app.config import Settings
from app.datasets.keys import upload_key
from app.db import session_scope
from app.models import Dataset, User, utcnow
from app.routing import Resources
from worker.sweeper import check_in, sweep_datasets, sweep_once


class Recorder:
    """The broker, as far as the sweeper sees it: what it was asked to send."""

    def __init__(self) -> None:
        self.prepared: list[str] = []

    def send_train(self, job_id: str, queue: str) -> None:
        pass

    def send_sample(self, request_id: str) -> None:
        pass

    def send_prepare(self, dataset_id: str) -> None:
        self.prepared.append(dataset_id)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "checkpoints")


def add(factory: sessionmaker[Session], owner: User, status: str, idle_s: float = 0.0, **values: object) -> uuid.UUID:
    """A data set row last touched `idle_s` ago."""
    with session_scope(factory) as s:
        dataset = Dataset(owner_id=owner.id, status=status, source="upload", received_bytes=0, size_bytes=0, **values)
        s.add(dataset)
        s.flush()
        s.execute(
            update(Dataset).where(Dataset.id == dataset.id).values(updated_at=utcnow() - timedelta(seconds=idle_s))
        )
        return dataset.id


def upload(store: LocalStore, factory: sessionmaker[Session], owner: User, idle_s: float) -> tuple[uuid.UUID, Path]:
    """An upload broken off `idle_s` ago, with its bytes so far."""
    dataset_id = uuid.uuid4()
    key = upload_key(dataset_id, "zip")
    path = store.root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x03\x04 part of an upload")
    add(factory, owner, "uploading", idle_s, id=dataset_id, archive_key=key, archive_format="zip")
    return dataset_id, path


def statuses(factory: sessionmaker[Session]) -> dict[uuid.UUID, tuple[str, str | None]]:
    with session_scope(factory) as s:
        return {d.id: (d.status, d.worker) for d in s.scalars(select(Dataset))}


def test_a_broken_off_upload_expires_with_its_bytes(
    clean_db: Settings, factory: sessionmaker[Session], store: LocalStore, owner: User
) -> None:
    expiry = clean_db.dataset_upload_expiry_s
    stale, stale_file = upload(store, factory, owner, idle_s=expiry + 60)
    live, live_file = upload(store, factory, owner, idle_s=expiry - 60)
    ready = add(factory, owner, "ready", idle_s=expiry + 60)  # old, but no upload: kept

    assert sweep_datasets(clean_db, factory, Recorder(), store) == (1, 0)
    assert set(statuses(factory)) == {live, ready} and stale not in statuses(factory)
    assert not stale_file.exists() and not stale_file.parent.exists()
    assert live_file.exists()
    assert sweep_datasets(clean_db, factory, Recorder(), store) == (0, 0)


def test_a_preparation_whose_worker_died_is_freed_and_sent_again(
    clean_db: Settings, factory: sessionmaker[Session], store: LocalStore, owner: User
) -> None:
    now = utcnow()
    dead = add(factory, owner, "preparing", worker="gone-host:1", dispatched_at=now)
    alive = add(factory, owner, "preparing", worker="live-host:2", dispatched_at=now)
    check_in(factory, "live-host:2", clean_db, Resources(1, 8), "cpu", sweep=False)
    broker = Recorder()
    assert sweep_datasets(clean_db, factory, broker, store) == (0, 1)
    assert broker.prepared == [str(dead)]
    assert statuses(factory) == {dead: ("preparing", None), alive: ("preparing", "live-host:2")}
    with session_scope(factory) as s:
        assert s.get(Dataset, dead).dispatched_at is not None  # type: ignore[union-attr]


def test_a_preparation_never_sent_is_sent_once_by_sweep_once(
    clean_db: Settings, factory: sessionmaker[Session], store: LocalStore, owner: User
) -> None:
    unsent = add(factory, owner, "preparing", idle_s=clean_db.resend_after_s + 5)
    just_made = add(factory, owner, "preparing")  # its own request is still sending it
    long_ago = add(
        factory,
        owner,
        "preparing",
        idle_s=clean_db.resend_after_s + 5,
        dispatched_at=utcnow() - timedelta(seconds=clean_db.resend_after_s + 5),
    )
    broker = Recorder()
    sweep_once(clean_db, factory, broker, store)
    assert sorted(broker.prepared) == sorted([str(unsent), str(long_ago)])
    assert str(just_made) not in broker.prepared
    sweep_once(clean_db, factory, broker, store)  # stamped dispatched_at just now: not sent again
    assert len(broker.prepared) == 2
