"""Live job events, fanned out in the API.

The worker publishes once: every metric point, checkpoint, sample and status change it makes is a
database row, read here through the jobs, metrics, checkpoints and samples repositories. The API
keeps one poller per watched job (whatever the number of watchers) that reads what is new and
hands it to every watcher's queue, so watchers cost the training nothing.
Events are keyed by (step, order); the key is the SSE `id:`, so a reconnect with Last-Event-ID
replays exactly what came after it from the database, then joins the live feed without repeats.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from anyio import to_thread
from sqlalchemy.orm import Session, sessionmaker

from app.checkpoints.repository import CheckpointRepository
from app.jobs.repository import JobRepository
from app.jobs.schemas import JobOut
from app.metrics.repository import MetricRepository
from app.models import Checkpoint, Job, MetricPoint, Sample
from app.samples.repository import SampleRepository
from app.samples.schemas import sample_url
from app.status import TERMINAL_STATUSES

log = logging.getLogger(__name__)

# Order of events within one step: the metric point, then the checkpoint, then the sample grid.
METRIC, CHECKPOINT, SAMPLE = 0, 1, 2


class InvalidEventId(ValueError):
    pass


@dataclass(frozen=True, order=True)
class EventKey:
    step: int
    order: int

    def __str__(self) -> str:
        return f"{self.step}.{self.order}"

    @classmethod
    def parse(cls, raw: str) -> EventKey:
        try:
            step, order = raw.split(".")
            key = cls(int(step), int(order))
        except ValueError as exc:
            raise InvalidEventId(f"Last-Event-ID {raw!r} is not an id this stream sent (STEP.ORDER)") from exc
        if key.step < 0 or key.order not in (METRIC, CHECKPOINT, SAMPLE):
            raise InvalidEventId(f"Last-Event-ID {raw!r} is not an id this stream sent")
        return key

    def last_step_through(self, order: int) -> int:
        """The last step whose event of `order` comes at or before this key (later ones are new)."""
        return self.step - (1 if order > self.order else 0)


@dataclass(frozen=True)
class Event:
    kind: str  # metric | checkpoint | sample | status
    data: dict[str, Any]
    key: EventKey | None = None  # status events are snapshots: no id

    def encode(self) -> str:
        head = f"event: {self.kind}\n" + (f"id: {self.key}\n" if self.key else "")
        return head + f"data: {json.dumps(self.data, separators=(',', ':'))}\n\n"


def _status_event(job: Job) -> Event:
    return Event("status", JobOut.model_validate(job).model_dump(mode="json"))


def _metric_event(p: MetricPoint) -> Event:
    data = {"step": p.step, "loss": p.loss, "lr": p.lr, "images_per_s": p.images_per_s}
    return Event("metric", data, EventKey(p.step, METRIC))


def _checkpoint_event(c: Checkpoint) -> Event:
    return Event(
        "checkpoint", {"step": c.step, "sha256": c.sha256, "size_bytes": c.size_bytes}, EventKey(c.step, CHECKPOINT)
    )


def _sample_event(s: Sample) -> Event:
    return Event("sample", {"step": s.step, "url": sample_url(s.job_id, s.step)}, EventKey(s.step, SAMPLE))


def _signature(event: Event) -> tuple[Any, ...]:
    d = event.data
    return (d["status"], d["attempt"], d["error"], d["cancel_requested"])


def read_events(factory: sessionmaker[Session], job_id: uuid.UUID, after: EventKey | None) -> tuple[Event, list[Event]]:
    """The job's status, and its keyed events after `after` in key order (a blocking read)."""
    after = after or EventKey(-1, SAMPLE)
    with factory() as session:
        if session.get_bind().dialect.name == "postgresql":
            # One snapshot for all four reads: a row committed between two of them could
            # otherwise be passed by the cursor (SQLite's read transaction is one snapshot anyway).
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        job = JobRepository(session).get(job_id)
        if job is None:
            raise LookupError(job_id)
        status = _status_event(job)
        points = MetricRepository(session).list(job_id, after_step=after.last_step_through(METRIC))
        checkpoints = CheckpointRepository(session).list(job_id, after_step=after.last_step_through(CHECKPOINT))
        samples = SampleRepository(session).list(job_id, after_step=after.last_step_through(SAMPLE))
    events = [_metric_event(p) for p in points]
    events += [_checkpoint_event(c) for c in checkpoints]
    events += [_sample_event(s) for s in samples]
    events.sort(key=lambda e: e.key)  # type: ignore[arg-type, return-value]
    return status, events


@dataclass
class _Feed:
    cursor: EventKey | None  # the last key this feed has handed out
    watchers: set[asyncio.Queue[Event | None]] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class EventHub:
    def __init__(self, factory: sessionmaker[Session], poll_interval_s: float = 0.5, keepalive_s: float = 15.0) -> None:
        self.factory = factory
        self.poll_interval_s = poll_interval_s
        self.keepalive_s = keepalive_s
        self._feeds: dict[uuid.UUID, _Feed] = {}

    def watcher_count(self, job_id: uuid.UUID) -> int:
        feed = self._feeds.get(job_id)
        return len(feed.watchers) if feed else 0

    async def stream(self, job_id: uuid.UUID, last_event_id: EventKey | None) -> AsyncIterator[str]:
        """SSE text for one watcher: what came after `last_event_id`, then live, until terminal."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        feed = self._feeds.get(job_id)
        replay: list[Event] = []
        if feed is None or feed.task is None or feed.task.done():
            # A new feed starts at this watcher's position: its first read is this replay.
            feed = self._feeds[job_id] = _Feed(cursor=last_event_id, watchers={queue})
            feed.task = asyncio.get_running_loop().create_task(self._poll(job_id, feed))
        else:
            # Join first, then read: everything the feed hands out later is newer than what
            # this read may miss, and the key check below drops what both deliver.
            feed.watchers.add(queue)
            status, replay = await to_thread.run_sync(read_events, self.factory, job_id, last_event_id)
            replay = [*replay, status] if status.data["status"] in TERMINAL_STATUSES else [status, *replay]
        sent, sent_status = last_event_id, None
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()  # when bytes last went out: keep-alives count from there
        try:
            for event in replay:
                queue.put_nowait(event)
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), max(0.0, quiet_since + self.keepalive_s - loop.time()))
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    quiet_since = loop.time()
                    continue
                if event is None:  # the feed ended after a terminal status
                    return
                if event.key is None:
                    if _signature(event) != sent_status:
                        sent_status = _signature(event)
                        yield event.encode()
                        quiet_since = loop.time()
                    if event.data["status"] in TERMINAL_STATUSES:
                        return
                elif sent is None or event.key > sent:
                    yield event.encode()
                    sent, quiet_since = event.key, loop.time()
        finally:
            self._leave(job_id, feed, queue)

    def _leave(self, job_id: uuid.UUID, feed: _Feed, queue: asyncio.Queue[Event | None]) -> None:
        feed.watchers.discard(queue)
        if not feed.watchers:
            if feed.task is not None:
                feed.task.cancel()
            if self._feeds.get(job_id) is feed:
                del self._feeds[job_id]

    async def _poll(self, job_id: uuid.UUID, feed: _Feed) -> None:
        """One reader per job: what is new since the last read goes to every watcher."""
        while feed.watchers:
            try:
                status, events = await to_thread.run_sync(read_events, self.factory, job_id, feed.cursor)
            except LookupError:
                status, events = None, []
            except Exception as exc:  # the database may be away for a moment: keep watching
                log.warning("event feed of job %s: read failed (%s); retrying", job_id, exc)
                await asyncio.sleep(self.poll_interval_s * 4)
                continue
            if events:
                feed.cursor = events[-1].key
            terminal = status is None or status.data["status"] in TERMINAL_STATUSES
            if status is None:  # the job is gone: end every watcher's stream
                batch: list[Event] = []
            elif terminal:
                batch = [*events, status]  # the terminal status comes last
            else:
                batch = [status, *events]
            for queue in list(feed.watchers):
                for event in batch:
                    queue.put_nowait(event)
                if terminal:
                    queue.put_nowait(None)
            if terminal:
                return
            await asyncio.sleep(self.poll_interval_s)
