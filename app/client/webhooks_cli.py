"""`ddpm webhooks ...`: endpoints told about your jobs' events, and what was sent to them.

ddpm webhooks add URL [--event E ...]     register one; prints its id and its secret (shown once)
ddpm webhooks list [--json]               your endpoints
ddpm webhooks delete ID                   stop sending to it (its deliveries go too)
ddpm webhooks deliveries ID [--limit N] [--json]   newest first, with each try's answer
"""

from __future__ import annotations

import itertools
from typing import Annotated

import typer

from app.client import cli
from app.client.cli import Column, _escape, _when, client_for, err, print_json, print_table, reports_errors

webhooks_app = typer.Typer(no_args_is_help=True, help="Endpoints told about your jobs' events (signed POSTs).")

DELIVERY_STYLE = {"pending": "yellow", "succeeded": "green", "failed": "red"}
WebhookId = Annotated[str, typer.Argument(metavar="ID", help="The endpoint's id (as `ddpm webhooks list` prints it).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]


@webhooks_app.command()
@reports_errors
def add(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(metavar="URL", help="Where events are POSTed (http or https).")],
    event: Annotated[
        list[str] | None,
        typer.Option(
            "--event",
            help="An event to send (repeat it); default every one: job.started, "
            "job.checkpoint, job.sample, job.evaluation, job.succeeded, job.failed, job.cancelled.",
        ),
    ] = None,
) -> None:
    """Register an endpoint; print its id, then its signing secret (shown this once only)."""
    with client_for(ctx) as client:
        webhook = client.add_webhook(url, event)
    typer.echo(webhook["id"])
    typer.echo(webhook["secret"])
    err.print(
        f"events: {', '.join(webhook['events'])}. Keep the secret: verify each delivery's webhook-signature "
        "with it (Standard Webhooks); it is not shown again.",
        soft_wrap=True,
    )


@webhooks_app.command("list")
@reports_errors
def list_(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Your endpoints, newest first."""
    with client_for(ctx) as client:
        webhooks = list(client.list_webhooks())
    if as_json:
        print_json(webhooks)
        return
    columns = [Column("id"), Column("url", shrink=True), Column("events", drop=2), Column("created", drop=1)]
    rows = [[w["id"], _escape(w["url"]), _events(w["events"]), _when(w["created_at"])] for w in webhooks]
    print_table(columns, rows)


@webhooks_app.command()
@reports_errors
def delete(ctx: typer.Context, webhook_id: WebhookId) -> None:
    """Delete an endpoint: nothing more is sent to it."""
    with client_for(ctx) as client:
        client.delete_webhook(webhook_id)
    err.print(f"deleted webhook {webhook_id}")


@webhooks_app.command()
@reports_errors
def deliveries(
    ctx: typer.Context,
    webhook_id: WebhookId,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many, newest first.")] = 20,
    as_json: AsJson = False,
) -> None:
    """What was sent to an endpoint: each event's status, tries and the latest answer."""
    with client_for(ctx) as client:
        items = list(itertools.islice(client.webhook_deliveries(webhook_id, limit=min(limit, 200)), limit))
    if as_json:
        print_json(items)
        return
    columns = [
        Column("id"),
        Column("event"),
        Column("step", drop=3),
        Column("status", style=lambda value: DELIVERY_STYLE.get(value, "white")),
        Column("tries", drop=2),
        Column("last answer", shrink=True),
        Column("created", drop=1),
    ]
    print_table(columns, [_delivery_row(d) for d in items])


def _delivery_row(delivery: dict) -> list[str]:
    tries = delivery["attempts"]
    last = tries[-1] if tries else None
    answer = "-" if last is None else (last["error"] or str(last["status_code"]))
    step = delivery["payload"].get("data", {}).get("step")
    return [
        delivery["id"],
        delivery["event"],
        "-" if step is None else str(step),
        delivery["status"],
        str(len(tries)),
        _escape(answer),
        _when(delivery["created_at"]),
    ]


def _events(events: list[str]) -> str:
    return "all" if len(events) == 7 else ", ".join(e.removeprefix("job.") for e in events)


cli.app.add_typer(webhooks_app, name="webhooks")
