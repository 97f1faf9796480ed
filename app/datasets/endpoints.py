"""Routes for /v1/datasets: upload an archive (raw body or a form, resumable with PATCH), or
name a source; list, read, preview and delete them.

The two upload routes stream their bodies (app/datasets/uploads.py): they take no SessionDep,
which would hold a pooled connection for the whole upload, but short units of work instead; and
they are exempt from the general body limit (DDPM_MAX_REQUEST_BYTES) and the whole-body read
deadline (app/server.py gives them an idle deadline per chunk): DDPM_MAX_DATASET_BYTES is theirs.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.checkpoints.files import CONDITIONAL_RESPONSES, checkpoint_store, verified_file_response
from app.datasets import service
from app.datasets.keys import ArchiveFormat
from app.datasets.schemas import DatasetOut, DatasetPage, DatasetSourceIn
from app.datasets.service import Allowance, DatasetTooLarge
from app.datasets.uploads import (
    ACCEPTED_TYPES,
    ARCHIVE_TYPES,
    JSON,
    MULTIPART,
    MULTIPART_SLACK,
    FormReader,
    FormUpload,
    PartFile,
    Sink,
    discard,
    finish,
    in_session,
    media_type,
    receive,
)
from app.db import session_scope
from app.deps import CurrentUser, SessionDep
from app.jobs.repository import InvalidCursor
from app.jobs.service import QuotaExceeded
from app.models import Dataset, User
from app.openapi import AUTHENTICATED, error_responses

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=AUTHENTICATED)

# The upload routes' own limit is DDPM_MAX_DATASET_BYTES, checked as bytes arrive; this lifts
# the app's general body limit off them (a route's limit replaces the app's).
NO_BODY_LIMIT = 1 << 62
DatasetStatus = Literal["uploading", "preparing", "ready", "failed"]
UploadComplete = Annotated[
    Literal["?0", "?1"],
    Header(description="`?1` (default): the body ends the archive; `?0`: more bytes follow with PATCH"),
]

_DATASET_ID = {"dataset_id": "$response.body#/id"}
_LINKS = {
    "GetDataset": {"operationId": "get_dataset", "parameters": _DATASET_ID, "description": "Its status"},
    "DeleteDataset": {"operationId": "delete_dataset", "parameters": _DATASET_ID, "description": "Delete it"},
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_FORM = {
    "type": "object",
    "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary"}, "name": {"type": "string", "maxLength": 200}},
}
_CREATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            **{t: _BINARY for t in ARCHIVE_TYPES},
            MULTIPART: {"schema": _FORM},
            JSON: {"schema": DatasetSourceIn.model_json_schema()},
        },
    }
}
_UPLOAD_ERRORS = {
    409: {
        "description": "Upload-Offset is not the stored size (Upload-Offset says it), or another request "
        "is sending this upload's bytes, or it is no longer uploading"
    },
    413: {"description": "Over DDPM_MAX_DATASET_BYTES (or the declared Upload-Length)"},
    415: {"description": "Not a content type this route accepts (the answer lists them)"},
    429: {"description": "Over the per-user data set count or storage quota"},
}


def _created(dataset: Dataset, status_code: int = status.HTTP_201_CREATED) -> JSONResponse:
    headers = {"Upload-Offset": str(dataset.received_bytes)}
    if status_code == status.HTTP_201_CREATED:
        headers["Location"] = f"/v1/datasets/{dataset.id}"
    return JSONResponse(DatasetOut.of(dataset).model_dump(mode="json"), status_code=status_code, headers=headers)


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    openapi_extra=_CREATE_BODY,
    max_body_size=NO_BODY_LIMIT,
    responses={201: {"description": "The data set", "links": _LINKS}, **error_responses(400, 422), **_UPLOAD_ERRORS},
)
async def create_dataset(
    request: Request,
    user: CurrentUser,
    name: Annotated[str | None, Query(max_length=200, description="Raw uploads: the data set's name")] = None,
    upload_length: Annotated[int | None, Header(ge=1, le=NO_BODY_LIMIT, description="The archive's size")] = None,
    upload_complete: UploadComplete = "?1",
) -> Response:
    """A data set from an archive (zip, tar, tar.gz) sent as the raw body (`curl --data-binary
    @x.zip -H 'Content-Type: application/zip'`) or as a form's `file`, or from a source URI
    (JSON `{"source": ...}`). It is `preparing` once its bytes are all here (a worker then makes
    it `ready` or `failed`); with `Upload-Complete: ?0` it stays `uploading` for PATCHes."""
    kind = media_type(request.headers.get("content-type"))
    if name is not None and "\0" in name:
        raise _refused(("query", "name"), "must not contain a NUL character")
    if kind in ARCHIVE_TYPES:
        return await _raw_upload(request, user, ARCHIVE_TYPES[kind], name, upload_length, upload_complete == "?1")
    if kind == MULTIPART:
        return await _form_upload(request, user)
    if kind == JSON:
        return await _from_source(request, user)
    raise HTTPException(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        detail=f"Content-Type {kind or '(none)'!r} is not accepted here: send one of {', '.join(ACCEPTED_TYPES)}",
    )


@router.patch(
    "/{dataset_id}/upload",
    response_model=DatasetOut,
    max_body_size=NO_BODY_LIMIT,
    openapi_extra={"requestBody": {"required": False, "content": {"application/offset+octet-stream": _BINARY}}},
    responses={**error_responses(404, 422), **_UPLOAD_ERRORS},
)
async def upload_more(
    dataset_id: uuid.UUID,
    request: Request,
    user: CurrentUser,
    upload_offset: Annotated[int, Header(ge=0, le=NO_BODY_LIMIT, description="The bytes already stored")],
    upload_complete: UploadComplete = "?1",
) -> Response:
    """The next bytes of an `uploading` data set, from `Upload-Offset` (the stored size: GET it,
    or read the 409's `Upload-Offset` header). Any Content-Type."""
    state = request.app.state
    dataset, allowed = await in_session(state.sessionmaker, service.resume_upload, dataset_id, user, state.settings)
    return await _stream(request, dataset, allowed, complete=upload_complete == "?1", offset=upload_offset)


@router.get("", response_model=DatasetPage, responses=error_responses(422))
def list_datasets(
    user: CurrentUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    status: DatasetStatus | None = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> DatasetPage:
    try:
        datasets, next_cursor = service.list_datasets(session, user, limit=limit, status=status, cursor=cursor)
    except InvalidCursor as exc:
        raise _refused(("query", "cursor"), str(exc)) from exc
    return DatasetPage(items=[DatasetOut.of(d) for d in datasets], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=error_responses(404, 422))
def get_dataset(dataset_id: uuid.UUID, user: CurrentUser, session: SessionDep) -> DatasetOut:
    return DatasetOut.of(service.get_dataset(session, dataset_id, user))


@router.get(
    "/{dataset_id}/preview.png",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "A grid of the data set's first images"},
        **CONDITIONAL_RESPONSES,
        307: {"description": "S3 storage with DDPM_S3_DOWNLOAD=redirect: a presigned URL of the file"},
        **error_responses(404, 410, 422),
    },
)
def dataset_preview(dataset_id: uuid.UUID, user: CurrentUser, request: Request, session: SessionDep) -> Response:
    dataset = service.get_dataset(session, dataset_id, user)
    if dataset.status != "ready" or dataset.preview_key is None or dataset.preview_sha256 is None:
        raise HTTPException(404, detail=f"data set {dataset_id} has no preview: it is {dataset.status}")
    return verified_file_response(
        request,
        dataset.preview_key,
        dataset.preview_sha256,
        size_bytes=dataset.preview_bytes,
        media_type="image/png",
    )


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404, 409, 422))
def delete_dataset(dataset_id: uuid.UUID, user: CurrentUser, request: Request) -> Response:
    """Forget the data set and remove its files; 409 while a queued or running job uses it."""
    with session_scope(request.app.state.sessionmaker) as session:
        keys = service.delete_dataset(session, dataset_id, user)
    service.remove_files(checkpoint_store(request), keys)  # once nothing names them
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# --- the upload flows ---------------------------------------------------------------------------
def _refused(loc: tuple[str, ...], msg: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": list(loc), "msg": msg, "input": None}])


async def _raw_upload(
    request: Request, user: User, fmt: ArchiveFormat, name: str | None, upload_length: int | None, complete: bool
) -> Response:
    state = request.app.state
    body_length = _content_length(request)
    expected = upload_length if upload_length is not None else (body_length if complete else None)
    if body_length is not None and upload_length is not None and body_length > upload_length:
        raise DatasetTooLarge(f"the body ({body_length} bytes) is longer than its Upload-Length ({upload_length})")
    dataset, allowed = await in_session(
        state.sessionmaker,
        service.start_upload,
        user,
        state.settings,
        name=name,
        archive_format=fmt,
        upload_length=upload_length,
        expected_bytes=expected,
    )
    return await _stream(request, dataset, allowed, complete=complete, offset=0, created=True)


async def _stream(
    request: Request, dataset: Dataset, allowed: Allowance, *, complete: bool, offset: int, created: bool = False
) -> Response:
    """The body appended to the data set's part file (see app/datasets/uploads.py)."""
    state, store = request.app.state, checkpoint_store(request)
    assert dataset.archive_key is not None
    part = await run_in_threadpool(PartFile, store.resolve(dataset.archive_key))
    try:
        if part.size != offset:
            raise service.DatasetConflict(
                f"Upload-Offset is {offset}, but {part.size} bytes of data set {dataset.id} are stored: "
                f"continue from {part.size}",
                offset=part.size,
            )
        body_length = _content_length(request)
        if body_length is not None:
            allowed.check(part.size + body_length)
        sink = Sink(state.sessionmaker, dataset.id, part, allowed)
        try:
            whole = await receive(request.stream(), sink)
        except (DatasetTooLarge, QuotaExceeded):
            part.close()
            await discard(state.sessionmaker, store, dataset.id)
            raise
        done = await finish(
            state.sessionmaker,
            store,
            state.dispatcher,
            sink,
            complete=complete and whole,
            upload_length=dataset.upload_length,
        )
    finally:
        part.close()
    return _created(done, status.HTTP_201_CREATED if created else status.HTTP_200_OK)


async def _form_upload(request: Request, user: User) -> Response:
    state, store = request.app.state, checkpoint_store(request)
    body_length = _content_length(request)
    if body_length is not None and body_length > state.settings.max_dataset_bytes + MULTIPART_SLACK:
        raise DatasetTooLarge(
            f"the form is {body_length} bytes; an archive may have at most {state.settings.max_dataset_bytes} "
            "(DDPM_MAX_DATASET_BYTES)"
        )
    parts: list[PartFile] = []

    async def start(fmt: ArchiveFormat, name: str | None) -> Sink:
        dataset, allowed = await in_session(
            state.sessionmaker,
            service.start_upload,
            user,
            state.settings,
            name=name,
            archive_format=fmt,
            upload_length=None,
            expected_bytes=None,
        )
        assert dataset.archive_key is not None
        parts.append(await run_in_threadpool(PartFile, store.resolve(dataset.archive_key)))
        return Sink(state.sessionmaker, dataset.id, parts[0], allowed)

    form = FormUpload(FormReader(request.headers["content-type"]), start)
    try:
        whole = await form.run(request.stream())
        assert form.sink is not None
        sink = form.sink
        done = await finish(
            state.sessionmaker, store, state.dispatcher, sink, complete=whole, upload_length=None, name=form.name
        )
    except (Exception, ClientDisconnect):
        if form.sink is not None:
            parts[0].close()
            await discard(state.sessionmaker, store, form.sink.dataset_id)
        raise
    finally:
        for part in parts:
            part.close()
    return _created(done)


async def _from_source(request: Request, user: User) -> Response:
    state = request.app.state
    limit = state.settings.max_request_bytes
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, detail=f"a JSON body may have at most {limit} bytes (DDPM_MAX_REQUEST_BYTES)")
    try:
        source = DatasetSourceIn.model_validate_json(bytes(body))
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False)
        raise RequestValidationError([{**e, "loc": ["body", *e["loc"]]} for e in errors]) from None
    dataset = await in_session(
        state.sessionmaker, service.create_from_source, state.dispatcher, user, state.settings, source
    )
    return _created(dataset)
