"""The OpenAI Files and Batches API (the official SDK's ``files`` and ``batches``), for batch input
and output files only. Files and batches belong to the key that made them: another key's are 404,
as absent ones. The work is done by ``batch/runner.py``."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from nla_serve.api.auth import require_key
from nla_serve.api.transport import OffLoopJSONRoute
from nla_serve.batch.files import ENDPOINTS, parse_lines
from nla_serve.batch.shape import COMPLETION_WINDOW, file_object, new_batch
from nla_serve.batch.store import BatchStore, FileRow, now
from nla_serve.errors import ClientError, NotFoundError, UnavailableError

router = APIRouter(route_class=OffLoopJSONRoute, dependencies=[Depends(require_key)])


def _batches(request: Request) -> tuple[BatchStore, object]:
    state = getattr(request.app.state, "batch", None)
    if state is None:
        raise UnavailableError("the Batch API is off on this server (--batch off)")
    return state


def _key(request: Request) -> str | None:
    return getattr(request.state, "key_id", None)


def _own_file(store: BatchStore, request: Request, file_id: str) -> FileRow:
    row = store.file(file_id)
    if row is None or row.key_id != _key(request):
        raise NotFoundError(f"no file with id {file_id!r}", param="file_id")
    return row


@router.post("/v1/files")
async def upload(request: Request, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]):
    store, _ = _batches(request)
    if purpose != "batch":
        raise ClientError(f"purpose {purpose!r} is not supported: this server keeps batch input files only "
                          "(purpose 'batch')", param="purpose")
    limits = request.app.state.settings.batch
    content = await file.read()
    if len(content) > limits.max_file_bytes:
        raise ClientError(f"the file has {len(content)} bytes; this server takes at most {limits.max_file_bytes}",
                          param="file")
    # checked now, so a bad file is refused at upload, naming its line (and again when a batch uses it)
    await asyncio.to_thread(parse_lines, content, endpoint=None, max_lines=limits.max_lines)
    row = FileRow("file-" + uuid.uuid4().hex, _key(request), purpose, file.filename or "batch.jsonl", len(content),
                  now())
    await asyncio.to_thread(store.add_file, row, content)
    return file_object(row)


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000):
    store, _ = _batches(request)
    rows = await asyncio.to_thread(store.files, _key(request), purpose, limit)
    return {"object": "list", "data": [file_object(r) for r in rows], "has_more": False}


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request):
    store, _ = _batches(request)
    return file_object(await asyncio.to_thread(_own_file, store, request, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request):
    store, _ = _batches(request)
    await asyncio.to_thread(_own_file, store, request, file_id)
    return Response(await asyncio.to_thread(store.file_content, file_id), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request):
    store, _ = _batches(request)
    await asyncio.to_thread(_own_file, store, request, file_id)
    deleted = await asyncio.to_thread(store.delete_file, file_id)
    return {"id": file_id, "object": "file", "deleted": deleted}


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input_file_id: StrictStr
    endpoint: Literal[ENDPOINTS]  # type: ignore[valid-type]
    completion_window: Literal["24h"] = COMPLETION_WINDOW
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None


@router.post("/v1/batches")
async def create_batch(body: BatchRequest, request: Request):
    store, runner = _batches(request)
    _own = await asyncio.to_thread(_own_file, store, request, body.input_file_id)
    content = await asyncio.to_thread(store.file_content, body.input_file_id)
    lines = await asyncio.to_thread(parse_lines, content, endpoint=body.endpoint,
                                    max_lines=request.app.state.settings.batch.max_lines)
    doc = new_batch(body.input_file_id, body.endpoint, len(lines), body.metadata)
    await asyncio.to_thread(store.add_batch, doc, _key(request), lines)
    runner.wake()
    return doc


def _own_batch(store: BatchStore, request: Request, batch_id: str) -> dict:
    found = store.batch(batch_id)
    if found is None or found[1] != _key(request):
        raise NotFoundError(f"no batch with id {batch_id!r}", param="batch_id")
    return found[0]


@router.get("/v1/batches")
async def list_batches(request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20):
    store, _ = _batches(request)
    docs = await asyncio.to_thread(store.batches, _key(request), after, limit + 1)
    return {"object": "list", "data": docs[:limit], "first_id": docs[0]["id"] if docs else None,
            "last_id": docs[:limit][-1]["id"] if docs else None, "has_more": len(docs) > limit}


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request):
    store, _ = _batches(request)
    return await asyncio.to_thread(_own_batch, store, request, batch_id)


@router.get("/v1/batches/{batch_id}/report")
async def batch_report(batch_id: str, request: Request, against: str | None = None):
    """The batch's report page (batch/report.py), against another batch of the same key if asked."""
    from fastapi.responses import HTMLResponse

    from nla_serve.batch.report import load_lines, render

    store, _ = _batches(request)
    runs = []
    for which in (batch_id, against):
        if which is None:
            continue
        doc = await asyncio.to_thread(_own_batch, store, request, which)
        if doc["status"] not in ("completed", "cancelled"):
            raise ClientError(f"batch {which} is {doc['status']}; its report is made when it has ended",
                              param="batch_id" if which == batch_id else "against")
        content = b""
        for file_id in (doc.get("output_file_id"), doc.get("error_file_id")):
            if file_id:
                content += await asyncio.to_thread(store.file_content, file_id) or b""
        # named as the batch's creator named it (metadata "label", else "model"), else by its id
        meta = doc.get("metadata") or {}
        runs.append(load_lines(content.decode("utf-8").splitlines(), meta.get("label") or meta.get("model") or which))
    if len(runs) == 2 and runs[0].name == runs[1].name:  # two runs of one model: their ids tell them apart
        runs[0].name, runs[1].name = batch_id, against
    base = str(request.base_url).rstrip("/")
    return HTMLResponse(await asyncio.to_thread(render, runs, server=base, title=f"Batch {batch_id}"))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request):
    store, runner = _batches(request)
    doc = await asyncio.to_thread(_own_batch, store, request, batch_id)
    doc = await asyncio.to_thread(store.advance, batch_id, ("validating", "in_progress"), status="cancelling",
                                  cancelling_at=now())
    if doc["status"] == "cancelling":
        runner.wake()
    elif doc["status"] != "cancelled":
        raise ClientError(f"batch {batch_id} is {doc['status']}; only a running batch can be cancelled",
                          param="batch_id")
    return doc
