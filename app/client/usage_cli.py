"""`ddpm usage`: GPU-seconds per user over a window of time (GET /v1/usage).

ddpm usage                          the last 30 days: you (an admin: every user)
ddpm usage --since 7d               an age (d, h, m), or an ISO 8601 time or date
ddpm usage --since 2026-11-01 --until 2026-12-01 --json
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from app.client.cli import AsJson, Column, _when, app, client_for, err, print_json, print_table, reports_errors

AGE = re.compile(r"^(\d+(?:\.\d+)?)([dhm])$")
UNITS = {"d": "days", "h": "hours", "m": "minutes"}
USAGE_COLUMNS = [
    Column("user", shrink=True),
    Column("GPU-hours"),
    Column("GPU-seconds", drop=1),
    Column("attempts", drop=2),
    Column("jobs", drop=3),
]
When = Annotated[
    str | None,
    typer.Option(metavar="WHEN", help="An ISO 8601 time or date (UTC without an offset), or an age: 7d, 12h, 30m."),
]


def when(value: str | None, now: datetime | None = None) -> str | None:
    """An age (`7d`) as the ISO 8601 time that long ago; anything else as given (the server
    checks it, and names the option it came from when it cannot use it)."""
    match = AGE.match(value.strip()) if value else None
    if match is None:
        return value
    ago = timedelta(**{UNITS[match[2]]: float(match[1])})
    return ((now or datetime.now(UTC)) - ago).isoformat()


@app.command()
@reports_errors
def usage(ctx: typer.Context, since: When = None, until: When = None, as_json: AsJson = False) -> None:
    """GPU-seconds, attempts and jobs per user from --since (default: 30 days ago) to --until
    (default: now): yours; an admin's key shows every user."""
    with client_for(ctx) as client:
        answer = client.usage(when(since), when(until))
    if as_json:
        print_json(answer)
        return
    err.print(f"from {_when(answer['since'])} to {_when(answer['until'])}")
    rows = [
        [u["user"], f"{u['gpu_seconds'] / 3600:,.2f}", f"{u['gpu_seconds']:,.0f}", str(u["attempts"]), str(u["jobs"])]
        for u in answer["items"]
    ]
    print_table(USAGE_COLUMNS, rows)
