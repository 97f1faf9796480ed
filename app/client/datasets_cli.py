"""`ddpm datasets ...`: upload, add, list, show, delete and preview the data sets jobs train on.

ddpm datasets upload PATH [--name N] [--wait]   an archive (.zip/.tar/.tar.gz) as it is, or a folder as a tar
ddpm datasets add SOURCE [--split S] [--wait]   s3://bucket/prefix/, https://host/x.zip, hf://namespace/name
ddpm datasets list / show ID [--json]           a table or a summary; --json prints the API's objects
ddpm datasets delete ID                         the data set and its files (refused while a job uses it)
ddpm datasets preview ID [--out FILE]           the PNG grid of its first images
ddpm submit spec.yaml --dataset ID              train on it
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from app.client import cli
from app.client.api import DdpmClient
from app.client.cli import Column, _escape, _when, client_for, err, out, print_json, print_table, reports_errors

datasets_app = typer.Typer(no_args_is_help=True, help="Upload and manage the data sets jobs train on.")

DATASET_STATUS_STYLE = {"uploading": "yellow", "preparing": "cyan", "ready": "green", "failed": "red"}


class DatasetStatus(StrEnum):
    uploading = "uploading"
    preparing = "preparing"
    ready = "ready"
    failed = "failed"


DATASET_COLUMNS = [
    Column("id"),
    Column("name", drop=4, shrink=True),
    Column("status", style=lambda value: DATASET_STATUS_STYLE.get(value, "white")),
    Column("images", drop=3),
    Column("skipped", drop=5),
    Column("size", drop=2),
    Column("created", drop=1),
]

DatasetId = Annotated[str, typer.Argument(metavar="ID", help="The data set's id (as `ddpm datasets list` prints it).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]
Name = Annotated[str | None, typer.Option("--name", help="A name for people (default: the file or folder name).")]
Wait = Annotated[bool, typer.Option("--wait", help="Wait until a worker has prepared it; print the summary.")]
Timeout = Annotated[
    float | None, typer.Option("--timeout", min=0, metavar="SECONDS", help="With --wait: give up after this long.")
]


@datasets_app.command()
@reports_errors
def upload(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(metavar="PATH", help="A .zip/.tar/.tar.gz/.tgz archive, or a folder.")],
    name: Name = None,
    wait: Wait = False,
    timeout: Timeout = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", metavar="ID", help="Go on with this data set's broken-off upload of the same PATH."),
    ] = None,
) -> None:
    """Upload images as a new data set and print its id: an archive as it is, or a folder as a tar.

    A folder goes as an uncompressed tar of its regular files, made on the fly (no temporary file).
    A dropped connection resumes where the server's copy ends."""
    started: list[str] = [resume] if resume else []
    with client_for(ctx) as client:
        try:
            with upload_progress(path) as progress:
                dataset = client.upload_dataset(
                    path, name=name, progress=progress, resume=resume, on_created=lambda d: started.append(d["id"])
                )
        except KeyboardInterrupt:
            if started:
                hint = f"stopped; go on with: ddpm datasets upload {_escape(path)} --resume {started[0]}"
                err.print(hint, soft_wrap=True)
            raise
        typer.echo(dataset["id"])
        err.print(f"uploaded {dataset['received_bytes']:,} bytes, sha256 verified; {_status(dataset['status'])}")
        finish(client, dataset, wait, timeout)


@datasets_app.command()
@reports_errors
def add(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Argument(metavar="SOURCE", help="s3://bucket/prefix/, https://host/x.zip or hf://namespace/name.")
    ],
    split: Annotated[str | None, typer.Option("--split", help="hf:// only: the split (default train).")] = None,
    name: Name = None,
    wait: Wait = False,
    timeout: Timeout = None,
) -> None:
    """Make a data set from a source a worker fetches and prepares; print its id."""
    with client_for(ctx) as client:
        dataset = client.add_dataset(source, split=split, name=name)
        typer.echo(dataset["id"])
        finish(client, dataset, wait, timeout)


def finish(client: DdpmClient, dataset: dict[str, Any], wait: bool, timeout: float | None) -> None:
    """Without --wait: say how to follow it. With it: wait, print the summary, exit 1 if it failed."""
    if not wait:
        err.print(f"a worker prepares it next; follow it with: ddpm datasets show {dataset['id']}", soft_wrap=True)
        return
    with err.status(f"waiting for a worker to prepare data set {dataset['id']}") as spinner:

        def note(polled: dict[str, Any]) -> None:
            spinner.update(f"data set {polled['id']} is {polled['status']}")

        dataset = client.wait_for_dataset(dataset["id"], timeout=timeout, on_poll=note)
    out.print(dataset_panel(dataset))
    if dataset["status"] != "ready":
        raise typer.Exit(1)


@datasets_app.command("list")
@reports_errors
def list_(
    ctx: typer.Context,
    status: Annotated[DatasetStatus | None, typer.Option("--status", help="Only data sets in this state.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Show at most this many (newest first).")] = 50,
    as_json: AsJson = False,
) -> None:
    """Your data sets, newest first."""
    with client_for(ctx) as client:
        datasets = []
        for dataset in client.list_datasets(status.value if status else None, limit=min(limit, 500)):
            datasets.append(dataset)
            if len(datasets) >= limit:
                break
    if as_json:
        print_json(datasets)
    elif datasets:
        print_table(DATASET_COLUMNS, [dataset_row(d) for d in datasets])
    else:
        err.print("no data sets" + (f" with status {status.value}" if status else ""))


def dataset_row(dataset: dict[str, Any]) -> list[str]:
    return [
        dataset["id"],
        dataset.get("name") or "",
        dataset["status"],
        _count(dataset.get("image_count")),
        _count(dataset.get("skipped")),
        _megabytes(dataset.get("size_bytes")),
        _when(dataset.get("created_at")),
    ]


@datasets_app.command()
@reports_errors
def show(ctx: typer.Context, dataset_id: DatasetId, as_json: AsJson = False) -> None:
    """A data set's state and, once prepared, its summary: images, skipped files and why, sizes."""
    with client_for(ctx) as client:
        dataset = client.get_dataset(dataset_id)
    if as_json:
        print_json(dataset)
    else:
        out.print(dataset_panel(dataset))


@datasets_app.command()
@reports_errors
def delete(ctx: typer.Context, dataset_id: DatasetId) -> None:
    """Delete a data set and its files (refused while a queued or running job uses it)."""
    with client_for(ctx) as client:
        client.delete_dataset(dataset_id)
    out.print(f"data set {dataset_id} deleted")


@datasets_app.command()
@reports_errors
def preview(
    ctx: typer.Context,
    dataset_id: DatasetId,
    out_path: Annotated[
        str, typer.Option("--out", "-o", help="A file name, or a folder where it keeps the server's name.")
    ] = ".",
) -> None:
    """Download the PNG grid of a ready data set's first images; print its path."""
    with client_for(ctx) as client:
        path = client.download_dataset_preview(dataset_id, out_path)
    typer.echo(str(path))


def dataset_panel(dataset: dict[str, Any]) -> Panel:
    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="bold")
    rows.add_column()
    rows.add_row("status", _status(dataset["status"]))
    rows.add_row("source", _escape(_source(dataset)))
    if dataset["status"] == "uploading":
        total = dataset.get("upload_length")
        rows.add_row("received", f"{_megabytes(dataset.get('received_bytes'))} of {_megabytes(total)}")
    if dataset.get("image_count") is not None:
        rows.add_row("images", _count(dataset["image_count"]))
    summary = dataset.get("summary") or {}
    for label, value in summary_rows(dataset, summary):
        rows.add_row(label, value)
    rows.add_row("size", _megabytes(dataset.get("size_bytes")))
    if dataset.get("sha256"):
        rows.add_row("sha256", dataset["sha256"])
    for field in ("created_at", "prepared_at"):
        if dataset.get(field):
            rows.add_row(field.removesuffix("_at"), _when(dataset[field]))
    if dataset.get("error"):
        rows.add_row("error", f"[red]{_escape(dataset['error'])}[/]")
    title = f"data set {dataset['id']}" + (f" · {_escape(dataset['name'])}" if dataset.get("name") else "")
    return Panel(rows, title=title, title_align="left", expand=False)


def summary_rows(dataset: dict[str, Any], summary: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """The prepared summary as rows: skipped (with reasons and examples), image sizes, modes."""
    if dataset.get("skipped"):
        reasons = summary.get("skipped_reasons") or {}
        why = ", ".join(f"{n} {_escape(str(reason))}" for reason, n in reasons.items())
        yield "skipped", f"{_count(dataset['skipped'])}" + (f" ({why})" if why else "")
        for example in (summary.get("skipped_examples") or [])[:5]:
            yield "", f"[dim]{_escape(str(example.get('name')))}: {_escape(str(example.get('reason')))}[/]"
    sizes = summary.get("sizes") or []
    if sizes:
        yield "sizes", ", ".join(f"{s['width']}x{s['height']} ({_count(s['count'])})" for s in sizes[:5])
    modes = summary.get("modes") or {}
    if modes:
        yield "modes", ", ".join(f"{mode} ({_count(n)})" for mode, n in modes.items())
    if summary.get("source_bytes"):
        yield (
            "read",
            _megabytes(summary["source_bytes"])
            + (f" of images in {summary['seconds']:.1f} s" if summary.get("seconds") is not None else ""),
        )


@contextmanager
def upload_progress(path: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar in MB/s on stderr at a terminal; elsewhere a plain line every few seconds."""
    if err.is_terminal:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task(f"upload {path}", total=None)
            last = [0]

            def update(done: int, total: int) -> None:
                if done < last[0]:
                    bar.console.print(f"[yellow]connection lost; resuming at byte {done:,}[/]")
                    bar.reset(task, total=total, completed=done)
                last[0] = done
                bar.update(task, completed=done, total=total)

            yield update
        return
    yield PlainProgress(err, path).update


class PlainProgress:
    """Upload progress as plain lines (a log file, a CI job): one every `every_s` and at the end."""

    def __init__(self, console: Console, path: str, every_s: float = 5.0) -> None:
        self.console, self.path, self.every_s = console, path, every_s
        self.started = self.last_line = time.monotonic()
        self.first = self.last = 0

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < self.last or (self.last == 0 and done == 0):
            if done or self.last:
                self.console.print(f"connection lost; resuming at byte {done:,}", highlight=False, soft_wrap=True)
            self.started, self.first = now, done
        self.last = done
        if done >= total or now - self.last_line >= self.every_s:
            self.last_line = now
            speed = (done - self.first) / max(now - self.started, 1e-6) / 1e6
            percent = 100 * done / total if total else 100
            self.console.print(
                f"upload {self.path}: {done / 1e6:,.1f}/{total / 1e6:,.1f} MB ({percent:.0f}%) {speed:,.1f} MB/s",
                highlight=False,
                soft_wrap=True,  # one line each, whatever the width: a log is read by grep
            )


def _status(value: str) -> str:
    return f"[{DATASET_STATUS_STYLE.get(value, 'white')}]{value}[/]"


def _source(dataset: dict[str, Any]) -> str:
    source = dataset.get("source") or "upload"
    if source == "upload":
        return f"upload ({dataset.get('format') or '?'})"
    return source + (f" (split {dataset['split']})" if dataset.get("split") else "")


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.1f} MB"


cli.app.add_typer(datasets_app, name="datasets")
