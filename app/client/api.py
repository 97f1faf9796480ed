"""`DdpmClient`: the ddpm-jobs HTTP API from Python, the layer under the `ddpm` CLI.

    from app.client import DdpmClient
    client = DdpmClient()                              # server and key from the environment
    job = client.submit({"training": {"steps": 500}})
    for event in client.events(job["id"]):             # metric, checkpoint, sample, evaluation, ...
        print(event.event, event.data)
    client.download(job["id"], "runs/")                # the newest checkpoint into runs/, sha256 checked

Every method raises `ApiError` (the server's status code and detail) for an error answer and
`ServerUnreachable` when no answer came. Server and key: explicit arguments, then
`DDPM_SERVER` / `DDPM_API_KEY`, then the embedded default's address (`DDPM_HOST`, `DDPM_PORT`)
and its key file (`$DDPM_DATA_DIR/api-key`, written by `ddpm-jobs serve`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, Literal

import httpx
from httpx_sse import SSEError, connect_sse

from app.client.archive import ArchiveError, UploadSource, sha256_of, upload_source
from app.embedded import DEFAULT_HOST, DEFAULT_PORT, api_key_path, data_dir_from_environment
from app.files import atomic_file
from app.status import TERMINAL_STATUSES

# Events stream over a connection that may stay quiet for a while: the server sends keep-alive
# comments when idle, so a read that waits this long means the connection is gone.
STREAM_READ_TIMEOUT_S = 90.0
CHUNK_BYTES = 1 << 20
# An upload that broke off is resumed after a GET of how far the server got (transport errors,
# 408 and 5xx answers; a 409 offset mismatch too): at most this many times in a row.
UPLOAD_RETRIES = 5
DATASET_TERMINAL = frozenset({"ready", "failed"})


class DdpmError(Exception):
    """Anything the client could not do; `str()` says what and why."""


class ApiError(DdpmError):
    """The server answered with an error: its status code and its `detail`, as sent."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"{status_code}: {format_detail(detail)}")


class ServerUnreachable(DdpmError):
    """No answer: the server is down, the address is wrong, or the connection broke."""


class ChecksumMismatch(DdpmError):
    """A downloaded file's sha256 is not the one the server recorded; the file was removed."""


class SampleFailed(DdpmError):
    """A sample request ended failed on its worker; `str()` holds the worker's reason."""


def format_detail(detail: Any) -> str:
    """FastAPI's detail as one readable line: validation errors become `field.path: message`."""
    if isinstance(detail, list):
        parts = []
        for error in detail:
            if isinstance(error, dict) and "msg" in error:
                loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
                parts.append(f"{'.'.join(loc)}: {error['msg']}" if loc else str(error["msg"]))
            else:
                parts.append(str(error))
        return "; ".join(parts)
    return str(detail)


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job's stream. `data` is the decoded JSON.

    `event` is `metric`, `checkpoint`, `sample`, `evaluation`, `training_event` or `status`; `id`
    is `<step>.<n>` (a training event's: `<step>.4.<its id>`) for all but status events (a snapshot
    of the whole job), whose id is None."""

    event: str
    id: str | None
    data: Any

    @property
    def is_terminal(self) -> bool:
        return self.event == "status" and isinstance(self.data, dict) and self.data.get("status") in TERMINAL_STATUSES


def resolve_server(server: str | None = None) -> str:
    """`server`, else DDPM_SERVER, else the embedded default's address (DDPM_HOST, DDPM_PORT)."""
    if server:
        return server.rstrip("/")
    if os.environ.get("DDPM_SERVER"):
        return os.environ["DDPM_SERVER"].rstrip("/")
    host = os.environ.get("DDPM_HOST") or DEFAULT_HOST
    if host in ("0.0.0.0", "::"):  # a bind-all address: the service is reachable locally
        host = DEFAULT_HOST
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{os.environ.get('DDPM_PORT') or DEFAULT_PORT}"


def resolve_api_key(api_key: str | None = None) -> str | None:
    """`api_key`, else DDPM_API_KEY, else the key file `ddpm-jobs serve` writes; None if none."""
    if api_key:
        return api_key
    if os.environ.get("DDPM_API_KEY"):
        return os.environ["DDPM_API_KEY"].strip()
    path = api_key_path(data_dir_from_environment())
    if path.is_file():
        with contextlib.suppress(OSError):
            return path.read_text().strip() or None
    return None


class DdpmClient:
    """A connection to one ddpm-jobs server with one API key. Use as a context manager, or
    call `close()`. `transport` replaces the network (tests pass an `httpx.MockTransport`)."""

    def __init__(
        self,
        server: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30,
        transport: httpx.BaseTransport | None = None,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 15.0,
        max_reconnects: int | None = 20,
    ) -> None:
        self.server = resolve_server(server)
        self.api_key = resolve_api_key(api_key)
        # The event stream reconnects after a drop: first after `reconnect_delay`, doubling up
        # to `max_reconnect_delay`; it gives up after `max_reconnects` failures in a row
        # (None: never). A connection that delivered an event resets the count.
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.max_reconnects = max_reconnects
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> DdpmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- jobs ---------------------------------------------------------------------------------
    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Queue a training job; the created job (or, repeating an Idempotency-Key, the earlier one)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._request("POST", "/v1/jobs", json=spec, headers=headers).json()

    def list_jobs(self, status: str | None = None, limit: int = 50) -> Iterator[dict[str, Any]]:
        """Every job the key may see, newest first, fetched `limit` at a time (cursor pages)."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        yield from self._pages("/v1/jobs", params)

    def get(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Queued: cancelled at once; running: at its next log point. 409 once it has finished."""
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def usage(self, since: str | None = None, until: str | None = None) -> dict[str, Any]:
        """GPU-seconds, attempts and jobs per user in [since, until) (ISO 8601; default: the last
        30 days): `{"since", "until", "items": [{"user_id", "user", "gpu_seconds", "attempts", "jobs"}]}`,
        yours only, or an admin's: every user."""
        params = {name: value for name, value in (("since", since), ("until", until)) if value}
        return self._request("GET", "/v1/usage", params=params).json()

    def delete(self, job_id: str) -> None:
        """Delete a finished job and everything it owns (rows and files); 409 while it is queued or running."""
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def continue_job(self, job_id: str, steps: int) -> dict[str, Any]:
        """Queue a finished job again to train to `steps` in all, from its latest checkpoint."""
        return self._request("POST", f"/v1/jobs/{job_id}/continue", json={"steps": steps}).json()

    def metrics(self, job_id: str, page_size: int = 1000) -> Iterator[dict[str, Any]]:
        """The loss history in step order, every page."""
        yield from self._pages(f"/v1/jobs/{job_id}/metrics", {"limit": page_size}, "after_step", "next_after_step")

    def evaluations(self, job_id: str, page_size: int = 1000) -> Iterator[dict[str, Any]]:
        """FID and KID measured during training, in step order, every page: `{"step", "fid",
        "kid", "kid_std", "samples", "reference_images", "feature_network", "seconds",
        "created_at"}`. None at all while the spec's `evaluation.every` is 0."""
        after_step = -1
        while True:
            params = {"after_step": after_step, "limit": page_size}
            page = self._request("GET", f"/v1/jobs/{job_id}/evaluations", params=params).json()
            yield from page
            if len(page) < page_size:
                return
            after_step = page[-1]["step"]

    def training_events(self, job_id: str, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """What happened to the job's runs, oldest first, every page: `{"id", "attempt", "step",
        "kind", "message", "detail", "created_at"}` (kind: oom_halved, compile_failed, graphs_failed)."""
        yield from self._pages(f"/v1/jobs/{job_id}/training-events", {"limit": page_size}, "after_id", "next_after_id")

    def logs(self, job_id: str, attempt: int | None = None, page_size: int = 1000) -> Iterator[dict[str, Any]]:
        """The worker's log lines for the job (one attempt's, or every attempt's in order), every
        page: `{"attempt", "seq", "at", "level", "logger", "message"}`."""
        params: dict[str, Any] = {"limit": page_size}
        if attempt is not None:
            params["attempt"] = attempt
        yield from self._pages(f"/v1/jobs/{job_id}/logs", params)

    # --- samples ------------------------------------------------------------------------------
    def samples(self, job_id: str) -> list[dict[str, Any]]:
        """The sample grids drawn during training: `[{"step", "url", "created_at"}]`."""
        return self._request("GET", f"/v1/jobs/{job_id}/samples").json()

    def sample(self, job_id: str, **request: Any) -> dict[str, Any]:
        """Ask a worker for new samples (count, seed, sampler, steps, checkpoint_step); None
        values are left for the server to choose."""
        body = {k: v for k, v in request.items() if v is not None}
        return self._request("POST", f"/v1/jobs/{job_id}/sample", json=body).json()

    def sample_request(self, job_id: str, request_id: str) -> dict[str, Any]:
        """A sample request as it stands: status, and once succeeded `png_url` and `npz_url`."""
        return self._request("GET", f"/v1/jobs/{job_id}/sample/{request_id}").json()

    def wait_for_sample(
        self,
        job_id: str,
        request_id: str,
        timeout: float | None = None,
        poll_interval: float = 0.25,
        max_poll_interval: float = 2.0,
    ) -> dict[str, Any]:
        """Poll a sample request until it has succeeded (growing the wait between polls from
        `poll_interval` to `max_poll_interval`) and return it. Raises SampleFailed with the
        worker's reason if it failed, DdpmError if `timeout` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll_interval
        while True:
            request = self.sample_request(job_id, request_id)
            if request["status"] == "succeeded":
                return request
            if request["status"] == "failed":
                raise SampleFailed(f"sample request {request_id} failed: {request.get('error') or 'no reason given'}")
            if deadline is not None and time.monotonic() + delay > deadline:
                raise DdpmError(f"sample request {request_id} is still {request['status']} after {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 1.5, max_poll_interval)

    def download_sample(
        self,
        request: dict[str, Any],
        folder: str | os.PathLike[str] = ".",
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Path]:
        """Download a succeeded sample request's PNG grid and .npz (key `images`, uint8
        (N, H, W, C)) into `folder` (created if missing), each checked against the sha256 the
        server sends with it; returns both paths."""
        if request.get("status") != "succeeded":
            raise DdpmError(f"sample request {request['id']} is {request.get('status')}, not succeeded")
        paths = []
        for url, suffix in ((request["png_url"], "png"), (request["npz_url"], "npz")):
            fallback = f"sample-{request['id']}.{suffix}"
            paths.append(self._save(url, as_folder(folder), fallback, progress=progress))
        return paths

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """`[{"step", "size_bytes", "sha256", "created_at"}]`, oldest first."""
        return self._request("GET", f"/v1/jobs/{job_id}/checkpoints").json()

    def download(
        self,
        job_id: str,
        dest: str | os.PathLike[str] = ".",
        step: int | Literal["best"] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Download a checkpoint (the newest when `step` is None; `"best"`: the one whose
        evaluation has the lowest FID) to `dest`: a folder, where it keeps the server's name
        (`<job>-step-00000120.safetensors`), or a file name (see `download_target` for which is
        which). Returns the file's path.

        The body goes to a temporary file beside the destination and is renamed into place only
        when its sha256 matches both the download's ETag / X-Checksum-SHA256 and the job's
        checkpoint list; otherwise the temporary file is removed and ChecksumMismatch raised.
        `progress(bytes_done, bytes_total)` is called as the bytes arrive."""
        listed = {c["step"]: c for c in self.checkpoints(job_id)}
        if step is None and listed:
            step = max(listed)  # asked for by step, so a newer checkpoint cannot slip in between
        path = f"/v1/jobs/{job_id}/checkpoints/{'latest' if step is None else step}"
        with self._stream("GET", path) as response:
            header_sha = _header_sha256(response)
            if not isinstance(step, int):  # the server chose (best, or latest with none listed a moment ago)
                step = _step_from_disposition(response) or 0
                if step not in listed:  # written since the list was read
                    listed = {c["step"]: c for c in self.checkpoints(job_id)}
            entry = listed.get(step)
            if entry is None:
                raise ApiError(404, f"job {job_id} lists no checkpoint at step {step}")
            if header_sha is not None and header_sha != entry["sha256"]:
                raise ChecksumMismatch(
                    f"the server sent checkpoint {step} with sha256 {header_sha}, but lists {entry['sha256']}"
                )
            target = download_target(dest, _server_filename(response, f"{job_id}-step-{step:08d}.safetensors"))
            total = int(response.headers.get("content-length") or entry["size_bytes"])
            _stream_to_file(response, target, entry["sha256"], total, progress)
        return target

    def export(
        self,
        job_id: str,
        dest: str | os.PathLike[str] = ".",
        step: int | Literal["best"] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Download a checkpoint (the newest when `step` is None; `"best"` as for `download`) as
        a zip of a diffusers pipeline folder (`DDPMPipeline.from_pretrained` loads it unpacked);
        `dest` as for `download`. The zip is made for this request, so it has no recorded sha256."""
        # The server resolves `latest` and `best` and names the file after the step it exported.
        path = f"/v1/jobs/{job_id}/checkpoints/{'latest' if step is None else step}/export"
        label = f"{step:08d}" if isinstance(step, int) else step or "latest"
        fallback = f"{job_id}-step-{label}-diffusers.zip"
        return self._save(path, dest, fallback, progress=progress, params={"format": "diffusers"})

    def download_grid(
        self, job_id: str, step: int, dest: str | os.PathLike[str] = ".", sha256: str | None = None
    ) -> Path:
        """Download the sample grid drawn during training at `step` (a PNG); `dest` as for
        `download`. `sha256` (from `samples()`) is checked when given, else the server's ETag."""
        fallback = f"{job_id}-samples-{step:08d}.png"
        return self._save(f"/v1/jobs/{job_id}/samples/{step}.png", dest, fallback, sha256=sha256)

    # --- data sets ----------------------------------------------------------------------------
    def upload_dataset(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        retries: int = UPLOAD_RETRIES,
        retry_delay: float = 0.5,
        resume: str | None = None,
        on_created: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Upload an archive file (.zip, .tar, .tar.gz; sent as it is) or a folder (sent as a
        deterministic tar made on the fly, see app.client.archive) as a new data set; returns it
        (status `preparing`: a worker prepares it next, see `wait_for_dataset`).

        The upload is resumable: a POST with no bytes makes the data set, then PATCHes send the
        bytes from the offset the server has. When the connection drops (or a 408/5xx answer
        comes), the client asks the server how far it got and sends the rest, up to `retries`
        times in a row with a doubling delay. At the end the server's sha256 of the archive
        must be the one of the bytes sent, else ChecksumMismatch. `progress(bytes_done, total)`.
        `resume`: the id of a data set whose upload of this same path broke off earlier (the
        client gave up): its bytes are sent from where the server's copy ends. `on_created(dataset)`
        is told of the new data set before its bytes go (to say how to resume it if stopped)."""
        try:
            source = upload_source(path)
        except ArchiveError as exc:
            raise DdpmError(str(exc)) from exc
        if resume is not None:
            return _ResumableUpload(self, resume, source, progress, retries, retry_delay).resume()
        params = {"name": name or source.name}
        headers = {
            "Content-Type": source.content_type,
            "Upload-Length": str(source.size),
            "Upload-Complete": "?0",
        }
        created = self._request("POST", "/v1/datasets", params=params, headers=headers, content=b"").json()
        if on_created is not None:
            on_created(created)
        return _ResumableUpload(self, created["id"], source, progress, retries, retry_delay).run()

    def add_dataset(self, source: str, split: str | None = None, name: str | None = None) -> dict[str, Any]:
        """A data set from a source a worker fetches: `s3://bucket/prefix/`, `https://host/x.zip`
        or `hf://namespace/name` (with `split`, default train). Status `preparing` at once."""
        body = {k: v for k, v in {"source": source, "split": split, "name": name}.items() if v is not None}
        return self._request("POST", "/v1/datasets", json=body).json()

    def list_datasets(self, status: str | None = None, limit: int = 50) -> Iterator[dict[str, Any]]:
        """Every data set the key may see, newest first, fetched `limit` at a time."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        yield from self._pages("/v1/datasets", params)

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/datasets/{dataset_id}").json()

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a data set and its files; 409 while a queued or running job uses it."""
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    # --- webhooks ---------------------------------------------------------------------------
    def add_webhook(self, url: str, events: list[str] | None = None) -> dict[str, Any]:
        """Register an endpoint for your jobs' events; the answer holds its signing `secret` (shown once)."""
        body: dict[str, Any] = {"url": url}
        if events:
            body["events"] = events
        return self._request("POST", "/v1/webhooks", json=body).json()

    def list_webhooks(self, limit: int = 50) -> Iterator[dict[str, Any]]:
        """Every endpoint the key may see, newest first."""
        yield from self._pages("/v1/webhooks", {"limit": limit})

    def delete_webhook(self, webhook_id: str) -> None:
        self._request("DELETE", f"/v1/webhooks/{webhook_id}")

    def webhook_deliveries(self, webhook_id: str, limit: int = 50) -> Iterator[dict[str, Any]]:
        """The endpoint's deliveries, newest first, each with its tries."""
        yield from self._pages(f"/v1/webhooks/{webhook_id}/deliveries", {"limit": limit})

    def _pages(
        self, path: str, params: dict[str, Any], cursor: str = "cursor", next_key: str = "next_cursor"
    ) -> Iterator[dict[str, Any]]:
        """Every item of a paged list: each page's `next_key` is the next request's `cursor`
        parameter; a page without one (null, or empty) is the last."""
        while True:
            page = self._request("GET", path, params=params).json()
            yield from page["items"]
            if page.get(next_key) in (None, ""):
                return
            params = {**params, cursor: page[next_key]}

    def wait_for_dataset(
        self,
        dataset_id: str,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        max_poll_interval: float = 5.0,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the data set is `ready` or `failed` (growing the wait between polls) and
        return it; DdpmError if `timeout` seconds pass first. `on_poll(dataset)` sees each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll_interval
        while True:
            dataset = self.get_dataset(dataset_id)
            if on_poll is not None:
                on_poll(dataset)
            if dataset["status"] in DATASET_TERMINAL:
                return dataset
            if deadline is not None and time.monotonic() + delay > deadline:
                raise DdpmError(f"data set {dataset_id} is still {dataset['status']} after {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 1.5, max_poll_interval)

    def download_dataset_preview(self, dataset_id: str, dest: str | os.PathLike[str] = ".") -> Path:
        """The data set's preview grid (a PNG of its first images) into `dest`, as `download`."""
        fallback = f"dataset-{dataset_id}-preview.png"
        return self._save(f"/v1/datasets/{dataset_id}/preview.png", dest, fallback)

    # --- the live event stream ----------------------------------------------------------------
    def events(
        self,
        job_id: str,
        last_event_id: str | None = None,
        on_reconnect: Callable[[str, float], None] | None = None,
    ) -> Iterator[Event]:
        """The job's events as they happen, until (and including) its terminal status event.

        A dropped connection (a network error, a 5xx, or a stream that ends before the job
        has) is reopened with `Last-Event-ID`, after a growing delay, so each metric, checkpoint,
        sample and evaluation event is yielded once. A status event comes on every connect; one that
        repeats the previous status and attempt is not yielded again. A finished job's terminal
        status comes last, after its history. `on_reconnect(reason,
        delay_s)` is told of each drop before the wait."""
        url = f"/v1/jobs/{job_id}/events"
        timeout = httpx.Timeout(self._http.timeout.connect, read=STREAM_READ_TIMEOUT_S)
        position = _StreamPosition(last_event_id)
        failures = 0
        base_delay = delay = self.reconnect_delay
        while True:
            headers = {"Last-Event-ID": position.last_event_id} if position.last_event_id else {}
            reason = "the stream ended before the job did"
            try:
                with connect_sse(self._http, "GET", url, headers=headers, timeout=timeout) as source:
                    _raise_for_status(source.response, hint_key=self.api_key is None, allow_retry=True)
                    # Every connection opens with a status snapshot. A terminal one is held back:
                    # the history that follows it comes first, and the stream ends with that
                    # status again (or just ends, when there was nothing to replay).
                    held: Event | None = None
                    opened = True  # no event read yet on this connection
                    for sse in source.iter_sse():
                        if sse.retry is not None:  # the server's own reconnection time
                            base_delay = sse.retry / 1000
                        event = _decode_event(sse.event, sse.id, sse.data)
                        if event is None:
                            continue
                        snapshot, opened = opened, False
                        if snapshot and event.is_terminal:
                            held = event
                            continue
                        if not position.advance(event):
                            continue
                        failures, delay = 0, base_delay  # progress: the next drop starts afresh
                        yield event
                        if event.is_terminal:
                            return
                    if held is not None and position.advance(held):
                        yield held
                        return
            except _Retryable as exc:
                reason = str(exc)
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except SSEError as exc:
                raise ApiError(406, f"{url} did not answer with an event stream: {exc}") from exc
            failures += 1
            if self.max_reconnects is not None and failures > self.max_reconnects:
                raise ServerUnreachable(f"lost the event stream of job {job_id} {failures} times: {reason}")
            if on_reconnect is not None:
                on_reconnect(reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, max(self.max_reconnect_delay, base_delay))

    # --- plumbing -----------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.server}: {exc}") from exc
        _raise_for_status(response, hint_key=self.api_key is None)
        return response

    def _save(
        self,
        path: str,
        dest: str | os.PathLike[str],
        fallback_name: str,
        *,
        sha256: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        params: dict[str, str] | None = None,
    ) -> Path:
        """GET `path` into `download_target(dest, <the server's file name, else fallback_name>)`,
        crash-safely; the body must hash to `sha256` (if given) and to the sha256 the server
        sends with it (if it does)."""
        with self._stream("GET", path, params=params) as response:
            header_sha = _header_sha256(response)
            if sha256 is not None and header_sha is not None and header_sha != sha256:
                raise ChecksumMismatch(f"the server sent {path} with sha256 {header_sha}, but lists {sha256}")
            target = download_target(dest, _server_filename(response, fallback_name))
            total = int(response.headers.get("content-length") or 0)
            _stream_to_file(response, target, sha256 or header_sha, total, progress)
        return target

    @contextlib.contextmanager
    def _stream(self, method: str, path: str, params: dict[str, str] | None = None) -> Iterator[httpx.Response]:
        try:
            # A download may answer 307 with a presigned S3 URL (DDPM_S3_DOWNLOAD=redirect); httpx
            # drops the Authorization header on the way to another origin.
            with self._http.stream(method, path, params=params, follow_redirects=True) as response:
                if response.is_error:
                    response.read()
                _raise_for_status(response, hint_key=self.api_key is None)
                yield response
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.server}: {exc}") from exc


class _StreamPosition:
    """How far a consumer of one job's events has got, across reconnects."""

    def __init__(self, last_event_id: str | None) -> None:
        self.last_event_id = last_event_id
        self._order = _event_order(last_event_id)
        self._status: tuple[Any, Any] | None = None

    def advance(self, event: Event) -> bool:
        """Whether `event` is new to the consumer (and if so, move past it)."""
        if event.event == "status":
            status = (event.data.get("status"), event.data.get("attempt"))
            if status == self._status and not event.is_terminal:
                return False  # the snapshot every connect starts with, unchanged
            self._status = status
            return True
        order = _event_order(event.id)
        if order is None:
            return True
        if self._order is not None and order <= self._order:
            return False  # yielded before the reconnect
        self._order, self.last_event_id = order, event.id
        return True


class _ResumableUpload:
    """The PATCH loop of `DdpmClient.upload_dataset` for one data set."""

    def __init__(
        self,
        client: DdpmClient,
        dataset_id: str,
        source: UploadSource,
        progress: Callable[[int, int], None] | None,
        retries: int,
        retry_delay: float,
    ) -> None:
        self.client, self.id, self.source = client, dataset_id, source
        self.progress, self.retries, self.delay = progress, retries, retry_delay
        self.sent_sha256: str | None = None  # of every byte, once one PATCH has carried the last

    def resume(self) -> dict[str, Any]:
        """Continue an upload the client gave up on, once the server's copy is known to match."""
        dataset = self.client.get_dataset(self.id)
        if dataset["status"] != "uploading":
            return self._check(dataset)
        if dataset.get("upload_length") not in (None, self.source.size):
            raise DdpmError(
                f"data set {self.id} expects {dataset['upload_length']:,} bytes, but this path makes "
                f"{self.source.size:,}: not the same files"
            )
        return self.run(dataset["received_bytes"])

    def run(self, offset: int = 0) -> dict[str, Any]:
        failures = 0
        while True:
            try:
                dataset, reason = self._patch(offset), None
            except _UploadInterrupted as exc:
                dataset, reason = None, str(exc)
            except ArchiveError as exc:
                raise DdpmError(f"{exc}; resume it later, or delete data set {self.id}") from exc
            if dataset is None:
                failures += 1
                if failures > self.retries:
                    raise ServerUnreachable(
                        f"the upload of data set {self.id} broke off {failures} times, at byte {offset:,} "
                        f"of {self.source.size:,}: {reason}; to go on from there later: "
                        f"ddpm datasets upload PATH --resume {self.id}"
                    )
                time.sleep(self.delay * 2 ** (failures - 1))
                dataset = self._where_is_it()
                if dataset is None:
                    continue
            if dataset["status"] != "uploading":
                return self._check(dataset)
            if dataset["received_bytes"] > offset:
                failures = 0  # it moved on: the next drop starts afresh
            offset = dataset["received_bytes"]

    def _patch(self, offset: int) -> dict[str, Any]:
        """Send the bytes from `offset`; the data set as the server answers. _UploadInterrupted
        when the transfer broke off or the server refused the offset (409)."""
        digest = sha256_of(self.source, offset)  # of the bytes the server already has
        headers = {
            "Upload-Offset": str(offset),
            "Upload-Complete": "?1",
            "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(self.source.size - offset),
        }
        try:
            response = self.client._http.patch(
                f"/v1/datasets/{self.id}/upload", content=self._body(offset, digest), headers=headers
            )
        except httpx.TransportError as exc:
            raise _UploadInterrupted(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc
        if response.status_code in (408, 409) or response.status_code >= 500:
            # 409: the offset moved, or a PATCH the client gave up on still holds the data set.
            raise _UploadInterrupted(f"HTTP {response.status_code}: {_detail_of(response)}")
        _raise_for_status(response, hint_key=self.client.api_key is None)
        self.sent_sha256 = digest.hexdigest()
        return response.json()

    def _body(self, offset: int, digest: Any) -> Iterator[bytes]:
        done = offset
        if self.progress is not None:
            self.progress(done, self.source.size)
        for chunk in self.source.chunks(offset):
            digest.update(chunk)
            yield chunk
            done += len(chunk)
            if self.progress is not None:
                self.progress(done, self.source.size)

    def _where_is_it(self) -> dict[str, Any] | None:
        """The data set as the server has it now; None while the server does not answer."""
        try:
            return self.client.get_dataset(self.id)
        except ServerUnreachable:
            return None
        except ApiError as exc:
            if exc.status_code == 408 or exc.status_code >= 500:
                return None
            if exc.status_code == 404:
                raise DdpmError(
                    f"the server dropped data set {self.id} during its upload (over a size limit or a quota?)"
                ) from exc
            raise

    def _check(self, dataset: dict[str, Any]) -> dict[str, Any]:
        """The finished upload's server-side sha256 against the bytes sent (made again if the
        last answer was lost); a mismatch leaves the data set for the user to delete."""
        sent = self.sent_sha256 or sha256_of(self.source).hexdigest()
        stored = dataset.get("archive_sha256")
        if stored is not None and stored != sent:
            raise ChecksumMismatch(
                f"data set {self.id}: the server stored an archive with sha256 {stored}, but the bytes "
                f"sent hash to {sent}; delete it (ddpm datasets delete {self.id}) and upload again"
            )
        return dataset


class _UploadInterrupted(Exception):
    """An upload's PATCH broke off (a transport error, 408 or 5xx): ask how far it got, resume."""


class _Retryable(Exception):
    """A stream answer worth retrying: the server or a proxy is briefly unavailable."""


def _raise_for_status(response: httpx.Response, *, hint_key: bool = False, allow_retry: bool = False) -> None:
    if not response.is_error:
        return
    if allow_retry and response.status_code in (502, 503, 504):
        raise _Retryable(f"HTTP {response.status_code}")
    detail = _detail_of(response)
    if response.status_code == 401 and hint_key:
        detail = f"{format_detail(detail)} (no API key found: pass --key, set DDPM_API_KEY, or run `ddpm-jobs serve`)"
    raise ApiError(response.status_code, detail)


def _detail_of(response: httpx.Response) -> Any:
    """An error answer's `detail` (FastAPI's), else its text, else its reason phrase."""
    if not response.is_closed:
        response.read()
    try:
        return response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return response.text or response.reason_phrase


def _decode_event(name: str, event_id: str, data: str) -> Event | None:
    """An Event from the parsed SSE fields; None for a block with no data."""
    if not data:
        return None
    try:
        payload = json.loads(data)
    except ValueError:
        payload = data
    # The SSE last-event-id buffer carries over to events without an `id:` line (status ones);
    # only events that have their own step-based id keep it.
    return Event(event=name, id=None if name == "status" else (event_id or None), data=payload)


def _event_order(event_id: str | None) -> tuple[int, ...] | None:
    """`"120.1"` -> (120, 1), `"120.4.7"` -> (120, 4, 7): event ids order by step, then by kind (then
    by a training event's id). None if not of that form."""
    if not event_id:
        return None
    try:
        return tuple(int(part) for part in event_id.split("."))
    except ValueError:
        return None


def _header_sha256(response: httpx.Response) -> str | None:
    """The sha256 the API sends with a file (ETag, X-Checksum-SHA256); None when it sends none, or
    when the file came from where a redirect pointed (S3's ETag is an MD5, not our sha256)."""
    if response.history:
        return None
    values = {
        v.strip().strip('"').lower()
        for v in (response.headers.get("x-checksum-sha256"), response.headers.get("etag"))
        if v and not v.startswith("W/")
    }
    if len(values) > 1:
        raise ChecksumMismatch(f"the download's ETag and X-Checksum-SHA256 disagree: {sorted(values)}")
    return values.pop() if values else None


def _step_from_disposition(response: httpx.Response) -> int | None:
    """The step in the file name the server suggests: `<job>-step-00000120.safetensors`."""
    disposition = response.headers.get("content-disposition", "")
    marker = "-step-"
    if marker not in disposition:
        return None
    digits = disposition.split(marker, 1)[1].split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


def download_target(dest: str | os.PathLike[str], filename: str) -> Path:
    """Where a download goes when asked to save it at `dest`, its own name being `filename`:

    - into the folder `dest`, under `filename`, when `dest` is an existing folder, ends in a path
      separator (`runs/`), or is a name without a file extension that is not an existing file
      (`runs`); the folder is created;
    - else to the file `dest` itself (`model.safetensors`, or an existing file), whose folder is
      created.

    `filename` must be a bare name (see `_server_filename`): nothing lands outside the folder."""
    path = Path(dest)
    raw = os.fspath(dest)
    as_folder = path.is_dir() or raw.endswith(("/", os.sep)) or (not path.suffix and not path.exists())
    target = path / filename if as_folder else path
    if as_folder and target.parent != path:  # a name with a separator would climb out
        raise DdpmError(f"refusing to write {filename!r}: not a plain file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def as_folder(folder: str | os.PathLike[str]) -> str:
    """`folder` spelt as a folder for `download_target` (a trailing separator), whatever its name."""
    raw = os.fspath(folder)
    return raw if raw.endswith(("/", os.sep)) else raw + os.sep


def _server_filename(response: httpx.Response, fallback: str) -> str:
    """The file name the server suggests in Content-Disposition (`filename*=` included), reduced
    to a safe bare name: path components stripped, and `fallback` instead of an empty, dot-led
    (`..`, hidden), or control-character name. A crafted name can never point outside the folder."""
    message = Message()
    message["content-disposition"] = response.headers.get("content-disposition", "")
    suggested = message.get_filename() or ""
    name = suggested.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name or name.startswith(".") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return fallback
    return name


def _stream_to_file(
    response: httpx.Response,
    target: Path,
    sha256: str | None,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Write the body crash-safely to `target` (app.files.atomic_file), renamed into place only
    if its sha256 is `sha256` (when one is known). Whatever goes wrong, the temporary file does
    not stay behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    done = 0
    with atomic_file(target, suffix=".part") as out:
        for chunk in response.iter_bytes(CHUNK_BYTES):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ChecksumMismatch(
                f"downloaded {done} bytes with sha256 {digest.hexdigest()}, expected {sha256}; nothing was saved"
            )
