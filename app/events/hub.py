"""Live job events, fanned out in the API.

The worker publishes once: every metric point, checkpoint, sample, evaluation and status change it
makes is a database row, read here through the jobs, metrics, checkpoints, samples and evaluations
repositories. The API keeps one poller per watched job (whatever the number of watchers) that
reads what is new and hands it to every watcher's queue, so watchers cost the training nothing.
Events are keyed by (step, order[, seq]); the key is the SSE `id:`, so a reconnect with Last-Event-ID
replays exactly what came after it from the database, then joins the live feed without repeats.
A feed starts at the job's newest event, never at a watcher's position, and a watcher's own
replay is its own read: one watcher's id (or a read that fails for it) never touches another's
stream. The poller also asks every few seconds whether its watchers' API keys were revoked, and
ends those streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from anyio import to_thread
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from app.auth.service import active_key_prefixes
from app.checkpoints.repository import CheckpointRepository
from app.config import Settings
from app.evaluations.repository import EvaluationRepository
from app.evaluations.schemas import EvaluationOut
from app.job_events.repository import JobEventRepository
from app.job_events.schemas import JobEventOut
from app.jobs.repository import JobRepository
from app.jobs.service import job_out
from app.metrics.repository import MetricRepository
from app.models import MAX_STEP, Checkpoint, Evaluation, Job, JobEvent, MetricPoint, Sample
from app.samples.repository import SampleRepository
from app.samples.schemas import sample_url
from app.status import TERMINAL_STATUSES

log = logging.getLogger(__name__)
T = TypeVar("T")

# Order of events within one step: the metric point, then the checkpoint, then the sample grid,
# then the evaluation (the order the training loop reports them in, worker/ddpm/sink.py), then the
# step's training events (job_events). A step can have several training events, and a resumed
# attempt can add more to a step already streamed, so theirs is STEP.4.ID (ID: the row's id).
METRIC, CHECKPOINT, SAMPLE, EVALUATION, TRAINING = 0, 1, 2, 3, 4
ORDERS = (METRIC, CHECKPOINT, SAMPLE, EVALUATION, TRAINING)
MAX_SEQ = 2**63 - 1  # job_events.id is a BigInteger


class InvalidEventId(ValueError):
    pass


@dataclass(frozen=True, order=True)
class EventKey:
    step: int
    order: int
    seq: int = 0  # a training event's job_events.id; 0 for the other orders

    def __str__(self) -> str:
        return f"{self.step}.{self.order}.{self.seq}" if self.order == TRAINING else f"{self.step}.{self.order}"

    @classmethod
    def parse(cls, raw: str) -> EventKey:
        try:
            step, order, *seq = (int(part) for part in raw.split("."))
            key = cls(step, order, *seq)
        except (ValueError, TypeError) as exc:
            raise InvalidEventId(f"{raw!r} is not an event id this stream sent (STEP.ORDER or STEP.4.ID)") from exc
        if not 0 <= key.step <= MAX_STEP or key.order not in ORDERS or not 0 <= key.seq <= MAX_SEQ:
            raise InvalidEventId(f"{raw!r} is not an event id this stream sent (STEP at most {MAX_STEP})")
        if (key.order == TRAINING) != (len(seq) == 1):
            raise InvalidEventId(f"{raw!r} is not an event id this stream sent (an ID with order 4 only)")
        return key

    def last_step_through(self, order: int) -> int:
        """The last step whose event of `order` comes at or before this key (later ones are new)."""
        return self.step - (1 if order > self.order else 0)


@dataclass(frozen=True)
class Event:
    kind: str  # metric | checkpoint | sample | evaluation | training_event | status
    data: dict[str, Any]
    key: EventKey | None = None  # status events are snapshots: no id

    def encode(self) -> str:
        head = f"event: {self.kind}\n" + (f"id: {self.key}\n" if self.key else "")
        return head + f"data: {json.dumps(self.data, separators=(',', ':'))}\n\n"


def _status_event(session: Session, job: Job, settings: Settings) -> Event:
    """The whole job as GET /v1/jobs/{id} shows it, `queue` and `waiting_reason` included."""
    return Event("status", job_out(session, job, settings).model_dump(mode="json"))


def _metric_event(p: MetricPoint) -> Event:
    data = {
        "step": p.step,
        "loss": p.loss,
        "lr": p.lr,
        "images_per_s": p.images_per_s,
        "loss_by_t": p.loss_by_t,
        "mfu": p.mfu,
        "peak_memory_bytes": p.peak_memory_bytes,
    }
    return Event("metric", data, EventKey(p.step, METRIC))


def _checkpoint_event(c: Checkpoint) -> Event:
    return Event(
        "checkpoint", {"step": c.step, "sha256": c.sha256, "size_bytes": c.size_bytes}, EventKey(c.step, CHECKPOINT)
    )


def _sample_event(s: Sample) -> Event:
    return Event("sample", {"step": s.step, "url": sample_url(s.job_id, s.step)}, EventKey(s.step, SAMPLE))


def _evaluation_event(e: Evaluation) -> Event:
    """GET /v1/jobs/{id}/evaluations' object without created_at (non-finite values as null)."""
    data = EvaluationOut.model_validate(e).model_dump(mode="json", exclude={"created_at"})
    return Event("evaluation", data, EventKey(e.step, EVALUATION))


def _training_event(e: JobEvent) -> Event:
    """GET /v1/jobs/{id}/training-events' object without created_at."""
    data = JobEventOut.model_validate(e).model_dump(mode="json", exclude={"created_at"})
    return Event("training_event", data, EventKey(e.step, TRAINING, e.id))


def _signature(event: Event) -> tuple[Any, ...]:
    d = event.data
    return (d["status"], d["attempt"], d["error"], d["cancel_requested"], d["waiting_reason"])


def _one_snapshot(session: Session) -> None:
    """Make the session's reads one snapshot: a row committed between two of them could otherwise
    be passed by the cursor (SQLite's read transaction is one snapshot anyway)."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


def read_events(
    factory: sessionmaker[Session], settings: Settings, job_id: uuid.UUID, after: EventKey | None
) -> tuple[Event, list[Event]]:
    """The job's status, and its keyed events after `after` in key order (a blocking read)."""
    after = after or EventKey(-1, ORDERS[-1])
    with factory() as session:
        _one_snapshot(session)
        job = JobRepository(session).get(job_id)
        if job is None:
            raise LookupError(job_id)
        status = _status_event(session, job, settings)
        points = MetricRepository(session).list(job_id, after_step=after.last_step_through(METRIC))
        checkpoints = CheckpointRepository(session).list(job_id, after_step=after.last_step_through(CHECKPOINT))
        samples = SampleRepository(session).list(job_id, after_step=after.last_step_through(SAMPLE))
        evaluations = EvaluationRepository(session).list(job_id, after_step=after.last_step_through(EVALUATION))
        training = JobEventRepository(session).since_step(job_id, after.step)
    events = [_metric_event(p) for p in points]
    events += [_checkpoint_event(c) for c in checkpoints]
    events += [_sample_event(s) for s in samples]
    events += [_evaluation_event(e) for e in evaluations]
    events += [event for event in map(_training_event, training) if event.key > after]  # type: ignore[operator]
    events.sort(key=lambda e: e.key)  # type: ignore[arg-type, return-value]
    return status, events


def read_head(factory: sessionmaker[Session], job_id: uuid.UUID) -> EventKey | None:
    """The job's newest event key (None before its first event): where a new feed starts reading."""
    with factory() as session:
        _one_snapshot(session)
        checkpoint = CheckpointRepository(session).latest(job_id)
        last = [
            (MetricRepository(session).last_step(job_id), METRIC),
            (checkpoint.step if checkpoint else None, CHECKPOINT),
            (SampleRepository(session).last_step(job_id), SAMPLE),
            (EvaluationRepository(session).last_step(job_id), EVALUATION),
        ]
        training = JobEventRepository(session).last(job_id)
    keys = [EventKey(step, order) for step, order in last if step is not None]
    keys += [EventKey(training[0], TRAINING, training[1])] if training else []
    return max(keys, default=None)


def read_active_keys(factory: sessionmaker[Session], prefixes: set[str]) -> set[str]:
    with factory() as session:
        return active_key_prefixes(session, prefixes)


def _is_terminal(event: Event) -> bool:
    return event.key is None and event.data["status"] in TERMINAL_STATUSES


def _database_away(exc: DBAPIError | PoolTimeout) -> bool:
    """A connection lost or refused, or no pooled one free: worth retrying. Anything else the
    database refuses (an out-of-range value, a bug) fails the same way every time."""
    return not isinstance(exc, DBAPIError) or isinstance(exc, OperationalError) or exc.connection_invalidated


@dataclass(eq=False)
class _Watcher:
    """One open stream: its queue, and the API key it was opened with (the stream ends when that
    key is revoked)."""

    key_prefix: str | None
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)  # None: the stream ends


@dataclass
class _Sent:
    """What one watcher was sent: keyed events once each and in key order, a status when it changed."""

    key: EventKey | None
    status: tuple[Any, ...] | None = None

    def admit(self, event: Event) -> str | None:
        """The SSE text of `event`, or None when this watcher has had it already."""
        if event.key is None:
            if _signature(event) == self.status:
                return None
            self.status = _signature(event)
        elif self.key is not None and event.key <= self.key:
            return None
        else:
            self.key = event.key
        return event.encode()


@dataclass
class _Feed:
    watchers: set[_Watcher]
    # The last key this feed has handed out. It starts at the job's newest event in the database,
    # never at a watcher's position: one watcher's Last-Event-ID cannot move another's stream.
    cursor: EventKey | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)  # set once `cursor` is read
    task: asyncio.Task[None] | None = None


class EventHub:
    def __init__(
        self,
        factory: sessionmaker[Session],
        settings: Settings,
        poll_interval_s: float = 0.5,
        keepalive_s: float = 15.0,
        key_check_s: float = 2.0,
    ) -> None:
        self.factory = factory
        self.settings = settings  # the queue names and worker lease that `waiting_reason` needs
        self.poll_interval_s = poll_interval_s
        self.keepalive_s = keepalive_s
        self.key_check_s = key_check_s  # how soon a revoked key's streams end
        self._feeds: dict[uuid.UUID, _Feed] = {}

    def watcher_count(self, job_id: uuid.UUID) -> int:
        feed = self._feeds.get(job_id)
        return len(feed.watchers) if feed else 0

    async def stream(
        self, job_id: uuid.UUID, last_event_id: EventKey | None, key_prefix: str | None = None
    ) -> AsyncIterator[str]:
        """SSE text for one watcher: what came after `last_event_id`, then live, until terminal
        (or until the API key with prefix `key_prefix` is revoked)."""
        watcher = _Watcher(key_prefix)
        feed = self._join(job_id, watcher)
        sent = _Sent(last_event_id)
        try:
            # Join, let the feed read where it starts, then replay from this watcher's own
            # position: the replay reaches at least that far, so nothing falls in between, and
            # `sent` drops what both deliver.
            await feed.started.wait()
            try:
                status, replay = await to_thread.run_sync(
                    read_events, self.factory, self.settings, job_id, last_event_id
                )
            except LookupError:
                return
            # The status snapshot always comes first. A finished job's stream is that snapshot,
            # what happened after `last_event_id`, and the terminal status once more as its last
            # event (when anything came between): a client reads until a terminal status that
            # is not the first event of its connection, or until the stream ends.
            for event in [status, *replay]:
                if text := sent.admit(event):
                    yield text
            if _is_terminal(status):
                if replay:
                    yield status.encode()
                return
            async for text in self._follow(watcher.queue, sent):
                yield text
        finally:
            self._leave(job_id, feed, watcher)

    async def _follow(self, queue: asyncio.Queue[Event | None], sent: _Sent) -> AsyncIterator[str]:
        """The live part of a stream: what the feed hands out, keep-alives while it is quiet."""
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()  # when bytes last went out: keep-alives count from there
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), max(0.0, quiet_since + self.keepalive_s - loop.time()))
            except TimeoutError:
                yield ": keep-alive\n\n"
                quiet_since = loop.time()
                continue
            if event is None:  # the feed ended, or this watcher's key was revoked
                return
            if text := sent.admit(event):
                yield text
                quiet_since = loop.time()
            if _is_terminal(event):
                return

    def _join(self, job_id: uuid.UUID, watcher: _Watcher) -> _Feed:
        feed = self._feeds.get(job_id)
        if feed is None or feed.task is None or feed.task.done():
            feed = self._feeds[job_id] = _Feed(watchers={watcher})
            feed.task = asyncio.get_running_loop().create_task(self._poll(job_id, feed))
            feed.task.add_done_callback(lambda task: self._ended(job_id, feed, task))
        else:
            feed.watchers.add(watcher)
        return feed

    def _leave(self, job_id: uuid.UUID, feed: _Feed, watcher: _Watcher) -> None:
        feed.watchers.discard(watcher)
        if not feed.watchers:
            if feed.task is not None:
                feed.task.cancel()
            if self._feeds.get(job_id) is feed:
                del self._feeds[job_id]  # a watcher arriving now starts a new feed

    def _ended(self, job_id: uuid.UUID, feed: _Feed, task: asyncio.Task[None]) -> None:
        """However the feed ended (terminal status, job gone, an error), its watchers' streams end."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("event feed of job %s failed; ending its streams", job_id, exc_info=exc)
        feed.started.set()
        for watcher in feed.watchers:
            watcher.queue.put_nowait(None)
        if self._feeds.get(job_id) is feed:
            del self._feeds[job_id]

    async def _read(self, job_id: uuid.UUID, read: Callable[..., T], *args: Any) -> T:
        """`read(*args)` in a thread, retried while the database is away."""
        while True:
            try:
                return await to_thread.run_sync(read, *args)
            except (DBAPIError, PoolTimeout) as exc:
                if not _database_away(exc):
                    raise
                log.warning("event feed of job %s: read failed (%s); retrying", job_id, exc)
                await asyncio.sleep(self.poll_interval_s * 4)

    async def _poll(self, job_id: uuid.UUID, feed: _Feed) -> None:
        """One reader per job: what is new since the last read goes to every watcher."""
        feed.cursor = await self._read(job_id, read_head, self.factory, job_id)
        feed.started.set()
        loop = asyncio.get_running_loop()
        next_key_check = loop.time() + self.key_check_s
        while feed.watchers:
            try:
                status, events = await self._read(job_id, read_events, self.factory, self.settings, job_id, feed.cursor)
            except LookupError:
                return  # the job is gone: every watcher's stream ends
            if events:
                feed.cursor = events[-1].key
            batch = [*events, status] if _is_terminal(status) else [status, *events]  # terminal comes last
            for watcher in feed.watchers:
                for event in batch:
                    watcher.queue.put_nowait(event)
            if _is_terminal(status):
                return
            if loop.time() >= next_key_check:
                await self._end_revoked(job_id, feed)
                next_key_check = loop.time() + self.key_check_s
            await asyncio.sleep(self.poll_interval_s)

    async def _end_revoked(self, job_id: uuid.UUID, feed: _Feed) -> None:
        """End the streams whose API key was revoked since they opened: one query per feed."""
        prefixes = {w.key_prefix for w in feed.watchers if w.key_prefix is not None}
        if not prefixes:
            return
        active = await self._read(job_id, read_active_keys, self.factory, prefixes)
        for watcher in list(feed.watchers):
            if watcher.key_prefix is not None and watcher.key_prefix not in active:
                log.info("event stream of job %s: API key %s revoked; closing it", job_id, watcher.key_prefix)
                feed.watchers.discard(watcher)
                watcher.queue.put_nowait(None)
