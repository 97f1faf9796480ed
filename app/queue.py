"""The Celery configuration both sides share, and the one way work is sent to the broker.

A task is sent by name with its row's id only, and only once that row is committed
(invariant 2): a service calls `send_after_commit(session, dispatcher, Task.train(...))` and the
session sends it when its transaction commits, then stamps the row's `dispatched_at`. When the
broker is unreachable the task is logged and `dispatched_at` stays null; the worker's sweeper
(worker/sweeper.py) sends such rows later with `dispatch`. Nothing here imports the worker.

The API's Dispatcher sends in the background: the committed tasks go to one sender thread, so a
request never waits for the broker (seconds of connect timeouts when it is down); the row is
stored, and sent now or by the sweeper. The worker's and the sweeper's Dispatchers send inline.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import KombuError
from sqlalchemy import Connection, Engine, event, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, SessionTransaction

from app.config import Settings
from app.models import Dataset, Job, SampleRequest, utcnow
from app.routing import sample_queue

log = logging.getLogger(__name__)

TRAIN_TASK = "jobs.train"
SAMPLE_TASK = "jobs.sample"
PREPARE_TASK = "datasets.prepare"
# After a failed background send, the sender thread leaves further tasks to the sweeper for this
# long instead of waiting out another connect timeout for each of them.
BROKER_DOWN_BACKOFF_S = 10.0


def celery_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "task_default_queue": settings.queue,
        "task_ignore_result": True,  # the database holds every result
        # Acknowledge after the task returns: a worker that dies mid-job leaves its message for
        # another. A re-delivery of a job that is running or finished does nothing (the claim
        # in worker/runner.py is conditional), so Celery may deliver more than once.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "broker_transport_options": {},
    }
    if settings.broker_url.startswith("filesystem://"):
        folder = settings.broker_folder
        for sub in ("processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        config["broker_transport_options"] = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            # Exchange bindings; kombu's default is ./control, relative to the working directory.
            "control_folder": str(folder / "control"),
        }
    else:
        # Fail fast in the API when the broker is down instead of retrying for minutes.
        config["broker_connection_timeout"] = 3
        # How long Redis waits for an acknowledgement before re-delivering a task. Training
        # outlasts any sane value; a re-delivered job that is already running does nothing.
        visibility = settings.broker_visibility_timeout_s
        config["broker_transport_options"] = {"visibility_timeout": visibility, "socket_connect_timeout": 3}
        if visibility < 600:
            # A short visibility timeout (a chaos drill) only bites if idle workers sweep for
            # unacknowledged messages often; kombu's default sweep is every ~100 s.
            config["broker_transport_options"] |= {"unacked_restore_interval": 1, "unacked_restore_throttle": 1}
    return config


def celery_queue(name: str) -> Queue:
    """A queue as Celery creates a missing one when a task is sent to it (a direct exchange of the
    same name), so that the worker's declaration and the API's sends agree."""
    return Queue(name, Exchange(name), routing_key=name)


def make_celery(settings: Settings) -> Celery:
    celery = Celery("ddpm-jobs")
    celery.config_from_object(celery_config(settings))
    return celery


class Dispatcher:
    """Sends tasks to the broker by name, with a row's id only. Services reach it through
    `send_after_commit`, and the sweeper through `dispatch`, so the row is always committed first.

    With `in_background` (the API's), `send_after_commit` hands committed tasks to one sender
    thread (`dispatch_in_background`) and the request goes on; `drain` waits for what it holds."""

    def __init__(self, settings: Settings, *, in_background: bool = False) -> None:
        self._settings = settings
        self._celery = make_celery(settings)
        self._background = ThreadPoolExecutor(1, thread_name_prefix="dispatch") if in_background else None
        self._broker_down_until = 0.0  # time.monotonic(); touched by the sender thread only

    @property
    def in_background(self) -> bool:
        return self._background is not None

    def dispatch_in_background(self, engine: Engine, task: Task) -> Future[None]:
        """`dispatch(engine, self, task)` on the sender thread, in the order tasks were handed over."""
        assert self._background is not None, "this Dispatcher sends inline"
        return self._background.submit(self._dispatch_unless_broker_down, engine, task)

    def _dispatch_unless_broker_down(self, engine: Engine, task: Task) -> None:
        if time.monotonic() < self._broker_down_until:
            log.warning("%s %s: not sent, the broker was down just now; the sweeper sends it", task.kind, task.row_id)
            return
        if not dispatch(engine, self, task):
            self._broker_down_until = time.monotonic() + BROKER_DOWN_BACKOFF_S

    def drain(self) -> None:
        """Wait until the tasks handed to the sender thread so far are done (the API's shutdown).
        The thread stays: an app may be started again (tests serve one app several times)."""
        if self._background is not None:
            self._background.submit(lambda: None).result()  # one thread: earlier tasks are done

    def send_train(self, job_id: str, queue: str) -> None:
        """Send to the job's queue (app.routing.train_queue). Raises an error from kombu/redis when
        the broker is unreachable."""
        self._celery.send_task(TRAIN_TASK, args=[job_id], queue=queue, retry=False)

    def send_sample(self, request_id: str) -> None:
        self._celery.send_task(SAMPLE_TASK, args=[request_id], queue=sample_queue(self._settings.queue), retry=False)

    def send_prepare(self, dataset_id: str) -> None:
        """Preparing a data set is CPU work beside training: the queue samples go to."""
        self._celery.send_task(PREPARE_TASK, args=[dataset_id], queue=sample_queue(self._settings.queue), retry=False)

    def ping(self) -> None:
        with self._celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)


class Sender(Protocol):
    """What sends tasks: a Dispatcher, or a test's recorder."""

    def send_train(self, job_id: str, queue: str) -> None: ...

    def send_sample(self, request_id: str) -> None: ...

    def send_prepare(self, dataset_id: str) -> None: ...


class TaskKind(enum.StrEnum):
    train = TRAIN_TASK
    sample = SAMPLE_TASK
    prepare = PREPARE_TASK


# The row each kind of task is about; each has a `dispatched_at` column.
_ROWS: dict[TaskKind, type[Job] | type[SampleRequest] | type[Dataset]] = {
    TaskKind.train: Job,
    TaskKind.sample: SampleRequest,
    TaskKind.prepare: Dataset,
}


@dataclass(frozen=True)
class Task:
    """One task for one committed row: its kind, the row's id and, for training, the queue of the
    workers that can hold the job (app.routing.train_queue). Sample requests go to the queue
    every worker consumes, which the Dispatcher knows."""

    kind: TaskKind
    row_id: uuid.UUID
    queue: str | None = None

    @classmethod
    def train(cls, job_id: uuid.UUID, queue: str) -> Task:
        return cls(TaskKind.train, job_id, queue)

    @classmethod
    def sample(cls, request_id: uuid.UUID) -> Task:
        return cls(TaskKind.sample, request_id)

    @classmethod
    def prepare(cls, dataset_id: uuid.UUID) -> Task:
        return cls(TaskKind.prepare, dataset_id)

    def send(self, sender: Sender) -> None:
        if self.kind is TaskKind.sample:
            sender.send_sample(str(self.row_id))
        elif self.kind is TaskKind.prepare:
            sender.send_prepare(str(self.row_id))
        else:
            assert self.queue is not None, "a training task needs the job's queue"
            sender.send_train(str(self.row_id), self.queue)


def dispatch(engine: Engine, sender: Sender, task: Task) -> bool:
    """Send a task whose row is committed, then stamp the row's `dispatched_at`. False when the
    broker is unreachable: the row stays undispatched and the sweeper sends it later."""
    try:
        task.send(sender)
    except (KombuError, OSError) as exc:  # kombu wraps the transport's connection errors
        log.warning("%s %s: not sent to the broker now (%s); the sweeper will send it", task.kind, task.row_id, exc)
        return False
    row = _ROWS[task.kind]
    try:
        with engine.begin() as conn:
            conn.execute(update(row).where(row.id == task.row_id).values(dispatched_at=utcnow()))
    except SQLAlchemyError as exc:  # sent but unstamped: the sweeper may send it once more, which is harmless
        log.warning("%s %s: sent, but dispatched_at not recorded (%s)", task.kind, task.row_id, exc)
    return True


def engine_of(session: Session) -> Engine:
    """The engine a session's rows live in, for `dispatch`'s own short connection."""
    bind = session.get_bind()
    return bind.engine if isinstance(bind, Connection) else bind


_PENDING = "app.queue.pending"  # session.info: tasks whose rows are not committed yet
_COMMITTED = "app.queue.committed"  # session.info: tasks whose rows are committed, to send


def send_after_commit(session: Session, sender: Sender, task: Task) -> None:
    """Send `task` once the session's transaction commits; nothing is sent if it rolls back.

    The send happens when the committed transaction has ended and handed its connection back to
    the pool: the row is committed, so a worker always finds it, and the `dispatched_at` stamp's
    own short connection never waits on the one this session still holds (under load, requests
    holding one connection each while waiting for a second would drain the pool)."""
    pending: list[tuple[Sender, Task]] | None = session.info.get(_PENDING)
    if pending is None:
        pending = session.info[_PENDING] = []
        session.info[_COMMITTED] = []
        event.listen(session, "after_commit", _mark_committed)
        event.listen(session, "after_transaction_end", _send_committed)
    pending.append((sender, task))


def _mark_committed(session: Session) -> None:
    # after_commit also fires when a savepoint is released; the work is not committed until the
    # outermost transaction is. The connection is still checked out here: send later.
    if session.get_nested_transaction() is None:
        pending = session.info[_PENDING]
        session.info[_COMMITTED].extend(pending)
        pending.clear()


def _send_committed(session: Session, transaction: SessionTransaction) -> None:
    # The outermost transaction has ended and its connection is back in the pool. Tasks still
    # pending belong to rows that were rolled back: dropped.
    if transaction.parent is not None:
        return
    session.info[_PENDING].clear()
    committed: list[tuple[Sender, Task]] = session.info[_COMMITTED]
    tasks, committed[:] = list(committed), []
    for sender, task in tasks:
        if isinstance(sender, Dispatcher) and sender.in_background:
            sender.dispatch_in_background(engine_of(session), task)
        else:
            dispatch(engine_of(session), sender, task)
