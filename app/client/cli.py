"""`ddpm`: submit, watch and fetch training jobs from the terminal.

    ddpm submit spec.yaml                  prints the new job's id (`-` reads the spec from stdin)
    ddpm watch ID                          a live progress bar until the job ends; exit 0 if it succeeded
    ddpm list / status / cancel / metrics  tables (metrics --csv); --json prints the API's objects
    ddpm continue ID --steps N             train a finished job on to N steps from its latest checkpoint
    ddpm delete ID [--yes]                 a finished job and everything it stored, for good
    ddpm checkpoints / samples ID          what a job has saved; samples --out DIR fetches the grids
    ddpm evaluations ID                    FID and KID measured during training (evaluation.every)
    ddpm events ID                         what happened to its runs: OOM steps redone smaller, failed compiles
    ddpm usage [--since 7d]                GPU-seconds per user (yours; an admin's key: everyone's)
    ddpm download / export ID --out runs/  a checkpoint (--step N or --best, default the newest), or a diffusers zip
    ddpm sample ID --wait --out DIR        draw new samples, then fetch the PNG grid and the .npz
    ddpm datasets upload PATH --wait       your images (an archive or a folder) as a data set;
    ddpm submit spec.yaml --dataset ID     then train on it (see `ddpm datasets --help`)

Piped or redirected, tables are plain aligned columns (nothing wrapped or cut). A download goes
into `--out` when it is a folder (existing, or ending in `/`, or a name without an extension),
under its own name, or else to that file name.

The server and key come from --server / --key, else DDPM_SERVER / DDPM_API_KEY, else the
embedded default (`ddpm-jobs serve`: http://127.0.0.1:8000 and the key it saved in var/api-key).
An error prints the server's detail in red and exits 1.
"""

from __future__ import annotations

import csv
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from app.client.api import ApiError, DdpmClient, DdpmError, Event, as_folder, format_detail
from app.spec_file import SpecFileError, parse_spec_document, read_spec_document
from app.status import JobStatus

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Drive ddpm-jobs training jobs.")
out = Console()
err = Console(stderr=True)

STATUS_STYLE = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "magenta"}


class Sampler(StrEnum):
    ddpm = "ddpm"
    ddim = "ddim"


@app.callback()
def connection(
    ctx: typer.Context,
    server: Annotated[str | None, typer.Option("--server", help="API address (env DDPM_SERVER)")] = None,
    key: Annotated[str | None, typer.Option("--key", help="API key (env DDPM_API_KEY)")] = None,
) -> None:
    ctx.obj = {"server": server, "key": key}


@contextmanager
def client_for(ctx: typer.Context) -> Iterator[DdpmClient]:
    obj = ctx.find_root().obj or {}
    with DdpmClient(obj.get("server"), obj.get("key")) as client:
        yield client


F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(command: F) -> F:
    """Print a client error's message in red and exit 1, never a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DdpmError as exc:
            message = format_detail(exc.detail) if isinstance(exc, ApiError) else str(exc)
            prefix = f"error ({exc.status_code})" if isinstance(exc, ApiError) else "error"
            err.print(f"[bold red]{prefix}:[/] [red]{_escape(message)}[/]")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return run  # type: ignore[return-value]


# --- submit ------------------------------------------------------------------------------------
@app.command()
@reports_errors
def submit(
    ctx: typer.Context,
    spec_file: Annotated[
        str | None,
        typer.Argument(metavar="SPEC", help="A JSON or YAML job spec; `-` reads stdin; none: the defaults."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Set the job's name (overrides the spec's).")] = None,
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="Submitting again with the same key returns the same job."
    ),
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", metavar="ID", help="Train on this ready data set of yours (ddpm datasets list)."),
    ] = None,
) -> None:
    """Queue a training job and print its id."""
    try:
        if spec_file is None:
            spec: dict[str, Any] = {}
        elif spec_file == "-":
            spec = parse_spec_document(sys.stdin.read(), "stdin")
        else:
            spec = read_spec_document(Path(spec_file))
    except SpecFileError as exc:
        raise DdpmError(str(exc)) from exc
    if name is not None:
        spec["name"] = name
    if dataset is not None:
        spec["dataset"] = on_dataset(spec.get("dataset"), dataset)
    with client_for(ctx) as client:
        job = client.submit(spec, idempotency_key=idempotency_key)
    typer.echo(job["id"])
    err.print(f"{_status(job['status'])} {job['total_steps']} steps; follow it with: ddpm watch {job['id']}")


def on_dataset(section: Any, dataset_id: str) -> dict[str, Any]:
    """The spec's `dataset` section pointed at data set `dataset_id`: kind `dataset` and its id;
    image_size, channels and random_flip stay as the spec has them, a folder's path goes."""
    kept = {k: v for k, v in section.items() if k not in ("kind", "id", "path")} if isinstance(section, dict) else {}
    return {"kind": "dataset", "id": dataset_id, **kept}


# --- list, status, cancel ----------------------------------------------------------------------
JobId = Annotated[str, typer.Argument(metavar="ID", help="The job's id (as `ddpm submit` and `ddpm list` print it).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]


@app.command("list")
@reports_errors
def list_(
    ctx: typer.Context,
    status: Annotated[JobStatus | None, typer.Option("--status", help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Show at most this many (newest first).")] = 50,
    as_json: AsJson = False,
) -> None:
    """The jobs this key may see, newest first."""
    with client_for(ctx) as client:
        jobs = list(islice(client.list_jobs(status.value if status else None, limit=min(limit, 500)), limit))
    if as_json:
        print_json(jobs)
    elif jobs:
        rows = [
            [
                job["id"],
                job.get("name") or "",
                job["status"],
                f"{job['step']}/{job['total_steps']}",
                _loss(job.get("loss")),
                _when(job.get("created_at")),
            ]
            for job in jobs
        ]
        print_table(JOB_COLUMNS, rows)
    else:
        err.print("no jobs" + (f" with status {status.value}" if status else ""))


@app.command()
@reports_errors
def status(ctx: typer.Context, job_id: JobId, as_json: AsJson = False) -> None:
    """A job's state, progress and timings."""
    with client_for(ctx) as client:
        job = client.get(job_id)
    if as_json:
        print_json(job)
    else:
        out.print(job_panel(job))


def job_panel(job: dict[str, Any]) -> Panel:
    spec = job.get("spec") or {}
    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="bold")
    rows.add_column()
    rows.add_row("status", _status(job["status"]) + (" (cancel requested)" if job.get("cancel_requested") else ""))
    rows.add_row("progress", f"{job['step']}/{job['total_steps']} steps ({_percent(job)})")
    rows.add_row("loss", _loss(job.get("loss")))
    rows.add_row("attempt", str(job.get("attempt", "")))
    dataset, model = spec.get("dataset") or {}, spec.get("model") or {}
    if dataset or model:
        rows.add_row(
            "model",
            f"{model.get('preset', '?')} on {dataset.get('kind', '?')} {dataset.get('image_size', '?')}px, "
            f"batch {(spec.get('training') or {}).get('batch_size', '?')}",
        )
    for field in ("created_at", "started_at", "finished_at", "heartbeat_at"):
        if job.get(field):
            rows.add_row(field.removesuffix("_at"), _when(job[field]))
    gpus = (spec.get("resources") or {}).get("gpus", 1)
    if job.get("worker") or gpus > 1:
        rows.add_row("worker", f"{_escape(job.get('worker') or '-')} ({gpus} GPU{'s' if gpus > 1 else ''})")
    if job.get("eta_seconds") is not None:
        rows.add_row("ETA", _duration(job["eta_seconds"]))
    if job.get("gpu_seconds"):
        rows.add_row("GPU time", _gpu_time(job["gpu_seconds"]))
    if job.get("waiting_reason"):
        rows.add_row("waiting", f"[yellow]{_escape(job['waiting_reason'])}[/]")
    if job.get("error"):
        rows.add_row("error", f"[red]{_escape(job['error'])}[/]")
    title = f"job {job['id']}" + (f" · {_escape(job['name'])}" if job.get("name") else "")
    return Panel(rows, title=title, title_align="left", expand=False)


@app.command()
@reports_errors
def cancel(ctx: typer.Context, job_id: JobId) -> None:
    """Cancel a job: a queued one at once, a running one at its next log point."""
    with client_for(ctx) as client:
        job = client.cancel(job_id)
    if job["status"] == "cancelled":
        out.print(f"job {job_id} {_status('cancelled')}")
    else:
        out.print(f"job {job_id} is {_status(job['status'])}; it stops at its next log point")


@app.command("continue")
@reports_errors
def continue_(
    ctx: typer.Context,
    job_id: JobId,
    steps: Annotated[int, typer.Option("--steps", min=1, help="The new total of steps: more than it has done.")],
) -> None:
    """Train a finished job on to --steps in all, resuming from its latest checkpoint."""
    with client_for(ctx) as client:
        job = client.continue_job(job_id, steps)
    status = _status(job["status"])
    out.print(f"job {job_id} {status} to {job['total_steps']} steps; follow it with: ddpm watch {job_id}")


@app.command()
@reports_errors
def delete(
    ctx: typer.Context,
    job_id: JobId,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a finished job with its checkpoints, samples and metrics, for good."""
    if not yes and not typer.confirm(f"delete job {job_id} and all its files?"):
        raise typer.Exit(1)
    with client_for(ctx) as client:
        client.delete(job_id)
    out.print(f"job {job_id} deleted")


# --- metrics, checkpoints, samples ---------------------------------------------------------------
METRIC_FIELDS = ("step", "loss", "lr", "images_per_s", "mfu", "peak_memory_bytes", "created_at")
GIB = 2**30


@app.command()
@reports_errors
def metrics(
    ctx: typer.Context,
    job_id: JobId,
    as_csv: Annotated[bool, typer.Option("--csv", help="Write CSV to stdout (every point, no table).")] = False,
    as_json: AsJson = False,
) -> None:
    """The job's loss history."""
    if as_csv and as_json:
        raise DdpmError("choose one of --csv and --json")
    with client_for(ctx) as client:
        if as_csv:
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(METRIC_FIELDS)
            for point in client.metrics(job_id):
                writer.writerow(["" if point.get(f) is None else point[f] for f in METRIC_FIELDS])
            return
        points = list(client.metrics(job_id))
    if as_json:
        print_json(points)
    elif not points:
        err.print(f"job {job_id} has no metrics yet")
    else:
        print_metrics(points)


def print_metrics(points: list[dict[str, Any]]) -> None:
    """The points as a table; the MFU and GPU memory columns only when a point has them (a CPU
    job's have neither)."""
    gpu = any(p.get("mfu") is not None or p.get("peak_memory_bytes") is not None for p in points)
    columns = [Column("step"), Column("loss"), Column("lr"), Column("images/s")]
    columns += [Column("MFU", drop=2), Column("peak GiB", drop=1)] if gpu else []
    rows = []
    for point in points:
        row = [str(point["step"]), _loss(point.get("loss")), f"{point['lr']:.3g}", f"{point['images_per_s']:.1f}"]
        row += [_mfu(point.get("mfu")) or "-", _gib(point.get("peak_memory_bytes")) or "-"] if gpu else []
        rows.append([*row, _when(point.get("created_at"))])
    print_table([*columns, Column("at")], rows)


@app.command("events")
@reports_errors
def training_events(ctx: typer.Context, job_id: JobId, as_json: AsJson = False) -> None:
    """What happened to the job's runs, oldest first: out-of-memory steps redone with a smaller
    micro-batch (oom_halved), a compile or CUDA-graph capture that failed."""
    with client_for(ctx) as client:
        listed = list(client.training_events(job_id))
    if as_json:
        print_json(listed)
    elif not listed:
        err.print(f"job {job_id} has no training events")
    else:
        rows = [
            [str(e["step"]), str(e["attempt"]), e["kind"], e["message"], _when(e.get("created_at"))] for e in listed
        ]
        columns = [Column("step"), Column("attempt", drop=2), Column("kind"), Column("message", shrink=True)]
        print_table([*columns, Column("at", drop=1)], rows)


# --- logs --------------------------------------------------------------------------------------
@app.command()
@reports_errors
def logs(
    ctx: typer.Context,
    job_id: JobId,
    attempt: Annotated[
        int | None, typer.Option("--attempt", min=1, help="Only this attempt's lines; default: every attempt.")
    ] = None,
) -> None:
    """What the worker logged while it ran the job, attempt by attempt (plain lines)."""
    shown = 0
    with client_for(ctx) as client:
        for line in client.logs(job_id, attempt):
            head = f"{_when(line.get('at'))} #{line['attempt']} {line['level']:<7} {line['logger']}:"
            typer.echo(f"{head} {line['message']}")
            shown += 1
    if not shown:
        err.print(f"job {job_id} has no log lines yet" + (f" for attempt {attempt}" if attempt else ""))


@app.command()
@reports_errors
def checkpoints(ctx: typer.Context, job_id: JobId, as_json: AsJson = False) -> None:
    """The job's checkpoints, oldest first (`ddpm download` fetches one, `ddpm export` as diffusers)."""
    with client_for(ctx) as client:
        listed = client.checkpoints(job_id)
    if as_json:
        print_json(listed)
    elif not listed:
        err.print(f"job {job_id} has no checkpoints yet")
    else:
        rows = [[str(c["step"]), f"{c['size_bytes']:,}", c["sha256"], _when(c.get("created_at"))] for c in listed]
        columns = [Column("step"), Column("bytes", drop=2), Column("sha256", shrink=True), Column("created", drop=1)]
        print_table(columns, rows)


@app.command()
@reports_errors
def evaluations(ctx: typer.Context, job_id: JobId, as_json: AsJson = False) -> None:
    """FID and KID of samples drawn during training (every evaluation.every steps), in step order."""
    with client_for(ctx) as client:
        listed = list(client.evaluations(job_id))
        every = None if listed else ((client.get(job_id).get("spec") or {}).get("evaluation") or {}).get("every")
    if as_json:
        print_json(listed)
    elif not listed:
        hint = (
            f"the first comes at step {every:,}"
            if every
            else "its spec's evaluation.every is 0: set it (say 1000) to measure FID every that many steps"
        )
        err.print(f"job {job_id} has no evaluations yet; {hint}")
    else:
        rows = [
            [
                str(e["step"]),
                _fid(e["fid"]),
                _kid(e["kid"], e["kid_std"]),
                f"{e['samples']:,}",
                f"{e['reference_images']:,}",
                e["feature_network"],
                f"{e['seconds']:.1f}",
                _when(e.get("created_at")),
            ]
            for e in listed
        ]
        columns = [
            Column("step"),
            Column("fid"),
            Column("kid", drop=5),
            Column("samples", drop=3),
            Column("reference", drop=2),
            Column("network", drop=4, shrink=True),
            Column("seconds", drop=1),
            Column("at", drop=6),
        ]
        print_table(columns, rows)


@app.command()
@reports_errors
def samples(
    ctx: typer.Context,
    job_id: JobId,
    as_json: AsJson = False,
    out_dir: Annotated[str | None, typer.Option("--out", "-o", help="Download the grids into this folder.")] = None,
    step: Annotated[int | None, typer.Option("--step", help="With --out: only the grid of this step.")] = None,
) -> None:
    """The sample grids drawn during training (every sample_every steps); --out downloads them."""
    with client_for(ctx) as client:
        listed = [s for s in client.samples(job_id) if step is None or s["step"] == step]
        if out_dir is not None:
            if not listed:
                raise DdpmError(f"job {job_id} has no sample grid" + (f" at step {step}" if step is not None else ""))
            for grid in listed:
                typer.echo(str(client.download_grid(job_id, grid["step"], as_folder(out_dir), grid["sha256"])))
            return
    if as_json:
        print_json(listed)
    elif not listed:
        err.print(f"job {job_id} has no sample grids yet")
    else:
        rows = [[str(s["step"]), s["url"], _when(s.get("created_at"))] for s in listed]
        print_table([Column("step"), Column("url", shrink=True), Column("created", drop=1)], rows)


# --- download, export --------------------------------------------------------------------------
OutPath = Annotated[
    str,
    typer.Option(
        "--out",
        "-o",
        help="A folder (one that exists, or a path ending in / or without an extension: created), "
        "where the file keeps its own name; or a file name.",
    ),
]
Step = Annotated[int | None, typer.Option("--step", help="This step's checkpoint (default: the newest).")]
Best = Annotated[
    bool, typer.Option("--best", help="The checkpoint with the lowest FID (a job with evaluation.every > 0).")
]


def chosen_checkpoint(step: int | None, best: bool) -> int | Literal["best"] | None:
    """What --step and --best ask for, as `DdpmClient.download` takes it."""
    if best and step is not None:
        raise DdpmError("choose one of --step and --best")
    return "best" if best else step


@app.command()
@reports_errors
def download(ctx: typer.Context, job_id: JobId, step: Step = None, best: Best = False, out_path: OutPath = ".") -> None:
    """Download a checkpoint (safetensors), checking its sha256."""
    chosen = chosen_checkpoint(step, best)
    label = f"checkpoint {'newest' if chosen is None else chosen}"
    with client_for(ctx) as client, download_progress(label) as progress:
        path = client.download(job_id, out_path, step=chosen, progress=progress)
    typer.echo(str(path))
    err.print(f"[green]sha256 verified[/] ({path.stat().st_size:,} bytes)")


@app.command()
@reports_errors
def export(ctx: typer.Context, job_id: JobId, step: Step = None, best: Best = False, out_path: OutPath = ".") -> None:
    """Download a checkpoint as a diffusers pipeline zip (unpacked, DDPMPipeline.from_pretrained loads it)."""
    chosen = chosen_checkpoint(step, best)
    with client_for(ctx) as client, download_progress(f"export {'newest' if chosen is None else chosen}") as progress:
        path = client.export(job_id, out_path, step=chosen, progress=progress)
    typer.echo(str(path))


@contextmanager
def download_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr, and the callback that moves it."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total or None)


# --- sample ------------------------------------------------------------------------------------
@app.command()
@reports_errors
def sample(
    ctx: typer.Context,
    job_id: JobId,
    count: Annotated[int | None, typer.Option("--count", min=1, help="Images to draw.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed (same seed, same images).")] = None,
    sampler: Annotated[Sampler | None, typer.Option("--sampler", help="ddpm: full chain; ddim: --steps.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Denoising steps (ddim).")] = None,
    checkpoint_step: Annotated[
        str | None,
        typer.Option("--checkpoint-step", metavar="STEP|best", help="A step, or best (lowest FID); default: newest."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the worker has drawn them.")] = False,
    out_dir: Annotated[
        str | None, typer.Option("--out", "-o", help="Wait, then download the PNG grid and the .npz into this folder.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0, metavar="SECONDS", help="Give up waiting after this long.")
    ] = None,
) -> None:
    """Ask a worker to draw samples from a job's checkpoint.

    Prints the request (JSON); with --wait, once drawn; with --out, the paths of its PNG grid and .npz."""
    chosen = int(checkpoint_step) if checkpoint_step and checkpoint_step.isdigit() else checkpoint_step
    options = {"count": count, "seed": seed, "steps": steps, "checkpoint_step": chosen}  # the server checks it
    with client_for(ctx) as client:
        try:
            request = client.sample(job_id, sampler=sampler.value if sampler else None, **options)
        except ApiError as exc:
            # A route the server does not have: FastAPI's plain "Not Found", or 405.
            if exc.status_code == 405 or (exc.status_code == 404 and exc.detail == "Not Found"):
                raise DdpmError(
                    f"{client.server} does not offer on-demand sampling (POST /v1/jobs/{{id}}/sample); "
                    "upgrade the server, or see the grids drawn during training: GET /v1/jobs/{id}/samples"
                ) from exc
            raise
        if wait or out_dir is not None:
            with err.status(f"waiting for sample request {request['id']}"):
                request = client.wait_for_sample(job_id, request["id"], timeout=timeout)
        if out_dir is not None:
            for path in client.download_sample(request, out_dir):
                typer.echo(str(path))
            return
    print_json(request)


# --- watch -------------------------------------------------------------------------------------
@app.command()
@reports_errors
def watch(ctx: typer.Context, job_id: JobId) -> None:
    """Follow a job live until it ends; exit 0 if it succeeded, 1 otherwise."""
    with client_for(ctx) as client:
        final = follow(client, job_id, out)
    if final is None:
        raise typer.Exit(1)
    out.print(f"job {job_id} {_status(final['status'])} at step {final['step']}/{final['total_steps']}")
    if final.get("error"):
        out.print(f"[red]{_escape(final['error'])}[/]")
    raise typer.Exit(0 if final["status"] == "succeeded" else 1)


class WatchView:
    """The progress bar's state, updated from the events (never from wall-clock guesses)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("step {task.fields[steps]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[quality]}"),
            TextColumn("{task.fields[speed]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=console,
            refresh_per_second=4,
        )
        self.task = self.bar.add_task(
            "connecting", total=None, steps="-", loss="-", quality="", speed="- img/s", eta="-"
        )
        self.batch_size: int | None = None
        self.total = 0
        self.quality = ""  # the latest evaluation's FID and KID, once there is one

    def on_event(self, event: Event) -> None:
        data = event.data
        if event.event == "status":
            self.total = data.get("total_steps") or self.total
            self.batch_size = ((data.get("spec") or {}).get("training") or {}).get("batch_size")
            attempt = data.get("attempt") or 1
            description = _status(data["status"]) + (f" (attempt {attempt})" if attempt > 1 else "")
            self.move(data.get("step", 0), description=description)
            if data.get("loss") is not None:
                self.bar.update(self.task, loss=_loss(data["loss"]))
            eta = data.get("eta_seconds")  # the server's, from the rate at the latest metric point
            self.bar.update(self.task, eta="-" if event.is_terminal or eta is None else _duration(eta))
            at = f" (ETA {_duration(eta)})" if eta is not None else ""
            self.note(f"status {_status(data['status'])} at step {data.get('step', 0)}{at}")
        elif event.event == "metric":
            speed = data.get("images_per_s")
            eta = self.eta(data["step"], speed)
            speed_text = _speed(speed, data.get("mfu"), data.get("peak_memory_bytes"))
            self.move(data["step"], loss=_loss(data.get("loss")), speed=speed_text, eta=eta)
            if not self.console.is_terminal:  # a log file gets one line per point instead of a bar
                loss = f"loss {_loss(data.get('loss'))}" + (f"  {self.quality}" if self.quality else "")
                line = f"step {data['step']}/{self.total}  {loss}  {speed_text}  ETA {eta}"
                self.console.print(line, highlight=False)
        elif event.event == "checkpoint":
            size, sha = data.get("size_bytes") or 0, data.get("sha256") or ""
            self.note(f"checkpoint at step {data['step']} ({size:,} bytes, sha256 {sha[:12]}…)")
        elif event.event == "sample":
            self.note(f"samples at step {data['step']}: {data.get('url', '')}")
        elif event.event == "training_event":
            self.note(f"[yellow]{_escape(data['kind'])} at step {data['step']}: {_escape(data['message'])}[/]")
        elif event.event == "evaluation":
            self.quality = f"FID {_fid(data['fid'])}  KID {_kid(data['kid'])}"
            self.bar.update(self.task, quality=self.quality)
            self.note(
                f"evaluation at step {data['step']}: FID {_fid(data['fid'])}, KID {_kid(data['kid'], data['kid_std'])} "
                f"({data['samples']:,} samples against {data['reference_images']:,} images, "
                f"{_escape(data['feature_network'])}, {data['seconds']:.1f} s)"
            )

    def move(self, step: int, **fields: Any) -> None:
        self.bar.update(
            self.task, completed=step, total=self.total or None, steps=f"{step}/{self.total or '?'}", **fields
        )

    def eta(self, step: int, images_per_s: float | None) -> str:
        if not images_per_s or not self.batch_size or not self.total:
            return "-"
        # The server's eta_seconds, the same way: steps left at images/s over images per step.
        return _duration(max(self.total - step, 0) * self.batch_size / images_per_s)

    def on_reconnect(self, reason: str, delay_s: float) -> None:
        self.note(f"[yellow]connection lost ({_escape(reason)}); reconnecting in {delay_s:.1f}s[/]")

    def note(self, text: str) -> None:
        self.bar.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {text}", highlight=False)


def follow(client: DdpmClient, job_id: str, console: Console) -> dict[str, Any] | None:
    """Show `job_id`'s events until its terminal status; that status's job, or None."""
    view = WatchView(console)
    final = None
    with view.bar:
        for event in client.events(job_id, on_reconnect=view.on_reconnect):
            view.on_event(event)
            if event.is_terminal:
                final = event.data
    return final


# --- formatting --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """A table column. At a terminal too narrow for every column whole, the `shrink` column (free
    text, such as a name) is cut short with an ellipsis, then the columns with a `drop` rank are
    left out, the highest first; the others are never cut nor wrapped."""

    header: str
    drop: int = 0
    shrink: bool = False
    style: Callable[[str], str] | None = None


JOB_COLUMNS = [
    Column("id"),  # whole: it is what the other commands take
    Column("name", drop=3, shrink=True),
    Column("status", style=lambda value: STATUS_STYLE.get(value, "white")),
    Column("step", drop=2),
    Column("loss", drop=4),
    Column("created", drop=1),
]
GAP = 2  # spaces between columns
MIN_SHRUNK = 8  # the narrowest a `shrink` column gets before it is dropped


def print_table(columns: list[Column], rows: list[list[str]]) -> None:
    """Rows of plain cells. Piped or redirected (stdout not a terminal): aligned text columns,
    nothing cut or wrapped, like `docker ps`. At a terminal: a rich table whose cells never wrap
    mid-word; when it is too narrow, columns shrink or go as `Column` says."""
    widths = [max([len(c.header), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]  # no rows too
    if not out.is_terminal:
        for line in [[c.header for c in columns], *rows]:
            typer.echo((" " * GAP).join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        return
    kept = list(range(len(columns)))

    def needed() -> int:
        return sum(min(widths[i], MIN_SHRUNK) if columns[i].shrink else widths[i] for i in kept) + GAP * (len(kept) - 1)

    for i in sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: -columns[i].drop):
        if needed() <= out.width:
            break
        kept.remove(i)
    fixed = sum(widths[i] for i in kept if not columns[i].shrink) + GAP * (len(kept) - 1)
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, GAP // 2))
    for i in kept:
        shrink = columns[i].shrink
        table.add_column(
            columns[i].header,
            no_wrap=True,
            overflow="ellipsis" if shrink else "ignore",
            max_width=max(out.width - fixed, MIN_SHRUNK) if shrink else None,
        )
    for row in rows:
        table.add_row(*(Text(row[i], style=columns[i].style(row[i]) if columns[i].style else "") for i in kept))
    out.print(table)


def print_json(value: Any) -> None:
    """`value` as indented JSON on stdout, never wrapped or styled."""
    typer.echo(json.dumps(value, indent=2))


def _status(value: str) -> str:
    return f"[{STATUS_STYLE.get(value, 'white')}]{value}[/]"


def _speed(images_per_s: float | None, mfu: float | None, peak_memory_bytes: int | None) -> str:
    """`1,234 img/s`, then the MFU and the peak GPU memory when the point has them."""
    parts = [f"{images_per_s:,.0f} img/s" if images_per_s else "- img/s"]
    parts += [f"MFU {text}" for text in [_mfu(mfu)] if text]
    parts += [f"{text} GiB" for text in [_gib(peak_memory_bytes)] if text]
    return "  ".join(parts)


def _mfu(value: float | None) -> str | None:
    return None if value is None else f"{value * 100:.1f}%"


def _gib(value: int | None) -> str | None:
    return None if value is None else f"{value / GIB:.1f}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fid(value: float) -> str:
    return f"{value:.2f}"


def _kid(value: float, std: float | None = None) -> str:
    """KID to four places (values are usually well under 1), with its std over the subsets."""
    return f"{value:.4f}" + ("" if std is None else f" ± {std:.4f}")


def _duration(seconds: float) -> str:
    """An ETA: HH:MM:SS under a day, else days."""
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} d"


def _gpu_time(seconds: float) -> str:
    return f"{seconds / 3600:,.2f} GPU-hours ({seconds:,.0f} GPU-seconds)"


def _percent(job: dict[str, Any]) -> str:
    return f"{100 * job['step'] / job['total_steps']:.0f}%" if job.get("total_steps") else "-"


def _when(value: str | None) -> str:
    if not value:
        return "-"
    try:
        return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def main() -> None:
    app(prog_name="ddpm")


# `ddpm datasets ...`, `ddpm usage` and `ddpm webhooks ...` live in their own modules, which use
# this one's helpers and add themselves to `app`: imported last, so it works whichever is imported first.
from app.client import datasets_cli, usage_cli, webhooks_cli  # noqa: E402, F401
