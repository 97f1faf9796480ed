"""The members of a data set named by a source URI instead of an upload:

    s3://bucket/prefix/    the objects under the prefix (the configured DDPM_S3_* endpoint and
                           keys): images one by one, archives downloaded into scratch and read
    https://host/x.zip     one archive, streamed into scratch (size-limited), then read
    hf://namespace/name    a Hugging Face data set's split, through the `datasets` library

https:// is a request the service makes on a user's behalf, so it is kept from reaching the
service's own network (request forgery): every address the host resolves to must be global,
the connection goes to the address that was checked (no second lookup a rebinding DNS could
answer differently) with the Host header and TLS name (SNI, certificate) of the original host,
and each redirect's target is checked the same way. DDPM_DATASET_URL_ALLOW_PRIVATE lifts the
address check (tests, a private mirror) and allows plain http://.

Any failure is PreparationFailed with a reason the user can act on.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from app import net
from app.checkpoints.store import make_s3_client
from worker.datasets import Limits, Member, PreparationFailed, Skipped, images
from worker.datasets.archive import archive_members
from worker.datasets.images import NOT_AN_IMAGE_FILE

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = tuple(sorted(images.IMAGE_SUFFIXES))  # what prepare decodes
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MAX_REDIRECTS = 5
# Connect, and each read: a server that stops sending for this long ends the download.
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
# The whole download (a server trickling a byte before each read timeout would never end):
# 20 GiB (the default DDPM_MAX_DATASET_BYTES) at 1 MB/s.
DOWNLOAD_DEADLINE_S = 6 * 3600.0
_CHUNK = 1 << 20
_HF_ID = re.compile(r"[\w.-]+/[\w.-]+")


def source_members(source: str, split: str | None, settings: Settings, scratch: Path) -> Iterator[Member | Skipped]:
    """Every file of the source, as `prepare` takes them (contract). Files fetched go under
    `scratch`, which the caller removes afterwards."""
    limits = Limits.from_settings(settings)
    scratch.mkdir(parents=True, exist_ok=True)
    if source.startswith("s3://"):
        yield from s3_members(source, settings, limits, scratch)
    elif source.startswith(("https://", "http://")):
        yield from archive_members(download(source, settings, scratch / "download"), limits)
    elif source.startswith("hf://"):
        yield from hf_members(source, split or "train", settings, scratch)
    else:
        raise PreparationFailed(f"unsupported source {source[:100]!r}: use s3://, https:// or hf://")


# --- s3:// -----------------------------------------------------------------------------------
def _s3_failure(what: str, exc: Exception) -> PreparationFailed:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return PreparationFailed(f"{what}: S3 refused ({error.get('Code')}: {error.get('Message')})")
    return PreparationFailed(f"{what}: S3 did not answer ({exc})")


def s3_members(source: str, settings: Settings, limits: Limits, scratch: Path) -> Iterator[Member | Skipped]:
    """Objects under s3://bucket/prefix: images read one by one, archives downloaded and read.
    Everything is listed first, so a source over DDPM_MAX_DATASET_BYTES fails before a byte moves."""
    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    if not bucket:
        raise PreparationFailed(f"{source!r} names no bucket: use s3://bucket/prefix/")
    own = settings.s3_prefix.strip("/")
    own = f"{own}/" if own else ""
    if bucket == settings.s3_bucket and (prefix.startswith(own) or own.startswith(prefix)):
        # The service's own files (every user's checkpoints and data sets) are not a source.
        raise PreparationFailed(f"{source} is where this service keeps its own files: name another bucket or prefix")
    client = make_s3_client(settings)
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        objects = [(item["Key"], int(item["Size"])) for page in pages for item in page.get("Contents", [])]
    except (ClientError, BotoCoreError, Boto3Error) as exc:
        raise _s3_failure(f"cannot list {source}", exc) from exc
    objects = [(key, size) for key, size in objects if not key.endswith("/")]  # folder markers
    if not objects:
        raise PreparationFailed(f"no object under {source}")
    total = sum(size for key, size in objects if key.lower().endswith(IMAGE_SUFFIXES + ARCHIVE_SUFFIXES))
    if total > limits.max_source_bytes:
        raise PreparationFailed(
            f"the objects under {source} take {total} bytes, over the limit of {limits.max_source_bytes} "
            "bytes (DDPM_MAX_DATASET_BYTES)"
        )
    for key, size in objects:
        lower = key.lower()
        if lower.endswith(IMAGE_SUFFIXES):
            yield Member(key, size, _s3_reader(client, bucket, key, size))
        elif lower.endswith(ARCHIVE_SUFFIXES):
            yield from _s3_archive(client, bucket, key, size, limits, scratch)
        else:
            yield Skipped(key, NOT_AN_IMAGE_FILE)  # never downloaded


def _s3_reader(client, bucket: str, key: str, size: int):  # type: ignore[no-untyped-def]
    def read() -> bytes:
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            data = body.read(size + 1)  # the listed size; an object grown since is refused
            body.close()
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise _s3_failure(f"cannot read s3://{bucket}/{key}", exc) from exc
        if len(data) != size:
            raise PreparationFailed(f"s3://{bucket}/{key} changed while it was read ({size} bytes listed)")
        return data

    return read


def _s3_archive(  # type: ignore[no-untyped-def]
    client, bucket: str, key: str, size: int, limits: Limits, scratch: Path
) -> Iterator[Member | Skipped]:
    path = scratch / f"s3-{hashlib.sha256(key.encode()).hexdigest()[:16]}"  # its format is sniffed
    try:
        client.download_file(bucket, key, str(path))
    except (ClientError, BotoCoreError, Boto3Error) as exc:
        raise _s3_failure(f"cannot download s3://{bucket}/{key}", exc) from exc
    try:
        if path.stat().st_size != size:
            raise PreparationFailed(f"s3://{bucket}/{key} changed while it was downloaded ({size} bytes listed)")
        for member in archive_members(path, limits):
            name = f"{key}/{member.name}"
            if isinstance(member, Skipped):
                yield Skipped(name, member.reason)
            else:
                yield Member(name, member.size, member.read)
    finally:
        path.unlink(missing_ok=True)


# --- https:// --------------------------------------------------------------------------------
def checked_address(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to (app/net.py: every address the host resolves to is public)."""
    try:
        return net.checked_address(host, port, allow_private, "DDPM_DATASET_URL_ALLOW_PRIVATE")
    except net.HostUnresolved as exc:
        raise PreparationFailed(str(exc)) from exc
    except net.AddressRefused as exc:
        raise PreparationFailed(f"refusing to fetch from {host}: {exc}") from exc


def _checked_url(raw: str, allow_private: bool) -> httpx.URL:
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, TypeError) as exc:
        raise PreparationFailed(f"not a valid URL: {raw[:200]!r} ({exc})") from exc
    if url.scheme != "https" and not (url.scheme == "http" and allow_private):
        raise PreparationFailed(f"refusing {url.scheme}:// ({raw[:200]}): only https:// sources are fetched")
    if url.userinfo:
        raise PreparationFailed("refusing a URL with a user name or password in it")
    if not url.host:
        raise PreparationFailed(f"no host in {raw[:200]!r}")
    return url


def download(source: str, settings: Settings, target: Path, verify: ssl.SSLContext | bool = True) -> Path:
    """Stream the URL into `target` (at most DDPM_MAX_DATASET_BYTES), following up to
    MAX_REDIRECTS redirects, each to a checked address; returns `target`. `verify`: the system's
    certificate authorities (or a test's own)."""
    allow_private = settings.dataset_url_allow_private
    url = _checked_url(source, allow_private)
    # No proxies from the environment (they would connect for us, to anything), no automatic redirects.
    with httpx.Client(timeout=TIMEOUT, follow_redirects=False, trust_env=False, verify=verify) as client:
        for _ in range(MAX_REDIRECTS + 1):
            host = url.raw_host.decode("ascii")  # IDNA-encoded, as DNS and TLS know it
            address = checked_address(host, url.port or (443 if url.scheme == "https" else 80), allow_private)
            # To the checked address, with the original name in Host and TLS (app/net.py).
            request = net.pinned_request(client, "GET", url, address, headers={"Accept-Encoding": "identity"})
            try:
                response = client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise PreparationFailed(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from exc
            try:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    url = _checked_url(str(url.join(location)), allow_private)
                    continue
                _save(response, url, settings.max_dataset_bytes, target)
                return target
            finally:
                response.close()
    raise PreparationFailed(f"{source[:200]} redirects more than {MAX_REDIRECTS} times")


def _save(response: httpx.Response, url: httpx.URL, limit: int, target: Path) -> None:
    if response.status_code != 200:
        raise PreparationFailed(f"{url} answered {response.status_code} {response.reason_phrase}")
    too_large = f"{url} is larger than the limit of {limit} bytes (DDPM_MAX_DATASET_BYTES)"
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PreparationFailed(f"{too_large}: it declares {declared} bytes")
    written, deadline = 0, time.monotonic() + DOWNLOAD_DEADLINE_S
    try:
        with target.open("wb") as out:
            for chunk in response.iter_raw(_CHUNK):  # as sent: an archive is read as the bytes it is
                written += len(chunk)
                if written > limit:
                    raise PreparationFailed(too_large)
                if time.monotonic() > deadline:
                    raise PreparationFailed(f"the download of {url} took over {DOWNLOAD_DEADLINE_S:.0f} s; stopped")
                out.write(chunk)
    except httpx.HTTPError as exc:
        target.unlink(missing_ok=True)
        raise PreparationFailed(f"the download of {url} broke off after {written} bytes: {exc}") from exc
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    if declared is not None and declared.isdigit() and written != int(declared):
        target.unlink(missing_ok=True)
        raise PreparationFailed(f"the download of {url} broke off after {written} of {declared} bytes")


# --- hf:// -----------------------------------------------------------------------------------
def hf_members(source: str, split: str, settings: Settings, scratch: Path) -> Iterator[Member | Skipped]:
    """A Hugging Face data set's split: its image column (found by its feature type) as the
    original bytes, one Member `<split>/<index>` per row."""
    import datasets

    repo = source.removeprefix("hf://").strip("/")
    if not _HF_ID.fullmatch(repo) or ".." in repo.split("/"):
        raise PreparationFailed(f"{source!r} is not hf://namespace/name")
    namespace, name = repo.split("/")
    local = settings.hf_datasets_dir / namespace / name if settings.hf_datasets_dir is not None else None
    if local is not None and not local.is_dir():
        raise PreparationFailed(f"no data set {repo} in DDPM_HF_DATASETS_DIR ({settings.hf_datasets_dir})")
    table = _hf_table(source, str(local or repo), split, settings.max_dataset_bytes, scratch / "hf-cache")
    column = next((key for key, feature in table.features.items() if isinstance(feature, datasets.Image)), None)
    if column is None:
        found = ", ".join(f"{key} ({feature})" for key, feature in table.features.items())
        raise PreparationFailed(f"{source} has no image column (a datasets.Image feature); its columns: {found}")
    rows = table.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    total, roots = 0, _hf_roots(local, scratch)
    for index, row in enumerate(rows):
        member = _hf_member(f"{split}/{index}", row[column], roots)
        if isinstance(member, Member):
            total += member.size
            if total > settings.max_dataset_bytes:
                raise PreparationFailed(
                    f"{source} holds more than the limit of {settings.max_dataset_bytes} bytes of images "
                    "(DDPM_MAX_DATASET_BYTES)"
                )
        yield member


def _hf_table(source: str, path: str, split: str, limit: int, cache: Path):  # type: ignore[no-untyped-def]
    """`load_dataset(path, split=split)`, once the size its card declares (when it does) fits
    DDPM_MAX_DATASET_BYTES. Its files go into `cache` (the preparation's scratch)."""
    import datasets

    datasets.disable_progress_bars()  # not a bar per split in the worker's log
    try:
        declared = datasets.load_dataset_builder(path, cache_dir=str(cache)).info.download_size
        if declared and declared > limit:
            raise PreparationFailed(
                f"{source} declares {declared} bytes to download, over the limit of {limit} bytes "
                "(DDPM_MAX_DATASET_BYTES)"
            )
        table = datasets.load_dataset(path, split=split, cache_dir=str(cache))
    except PreparationFailed:
        raise
    except Exception as exc:  # the library's errors have no common base: missing, no such split, offline...
        raise PreparationFailed(f"cannot load {source} (split {split!r}): {type(exc).__name__}: {exc}") from exc
    if not isinstance(table, datasets.Dataset):
        raise PreparationFailed(f"{source} (split {split!r}) is not one table")
    return table


def _hf_roots(local: Path | None, scratch: Path) -> list[Path]:
    """Where an image column's file paths may point: the data set's own folder, or its download
    (load_dataset's cache_dir is in the scratch folder)."""
    return [local.resolve(), scratch.resolve()] if local is not None else [scratch.resolve()]


def _hf_member(name: str, value: dict | None, roots: list[Path]) -> Member | Skipped:
    """A row's image: its bytes, or the file the row names when that lies in the data set's own
    files (a row naming /etc/passwd is skipped, never read)."""
    if not value:
        return Skipped(name, "no image in this row")
    data = value.get("bytes")
    if data is not None:
        return Member(name, len(data), lambda: data)
    path = value.get("path")
    if not path:
        return Skipped(name, "no image in this row")
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root) for root in roots) or not resolved.is_file():
        return Skipped(name, "its image is a file outside the data set")
    return Member(name, resolved.stat().st_size, resolved.read_bytes)
