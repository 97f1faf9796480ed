"""A job's states, as the database stores them, the API sends them and the client shows them.

    queued → running → succeeded | failed | cancelled   (running → queued when a lost attempt resumes)

Shared by the server (`app.models`) and the client (`app.client`), so it imports nothing but the
standard library: the client must stand alone, without SQLAlchemy or anything else of the server.
"""

from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


# A job in one of these states never changes again. A StrEnum hashes and compares as its value,
# so a plain string from JSON (`"failed" in TERMINAL_STATUSES`) is found too.
TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
