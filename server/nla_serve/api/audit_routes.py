"""``/v1/audit/*``: the record, its proofs, and search, behind the admin key (auth.require_admin).

    GET /v1/audit/checkpoint               the latest signed checkpoint (signing one first if
                                           records are past it) and the verifier key
    GET /v1/audit/consistency?from=&to=    a consistency proof between two signed checkpoints
    GET /v1/audit/records                  records by time, paged (since, until, cursor, limit)
    GET /v1/audit/records/{id}             one record with its inclusion proof
    GET /v1/audit/search?q=...             explanations and outputs, filtered (verdict= for claims), newest
                                           first, paged
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request

from nla_serve.api.auth import require_admin
from nla_serve.api.routes import OffLoopJSONRoute, service_of
from nla_serve.audit.proofs import checkpoint_document, consistency_document, record_document
from nla_serve.audit.record import iso
from nla_serve.audit.store import QueryError, parse_query, parse_time, search_log
from nla_serve.errors import ClientError, NotFoundError

router = APIRouter(route_class=OffLoopJSONRoute, dependencies=[Depends(require_admin)])


def audit_of(request: Request):
    svc = service_of(request)
    if svc.audit is None:
        raise NotFoundError("the audit log is off on this server (it was started with --audit off)",
                            code="audit_off")
    return svc.audit


async def covered(audit, seq: int | None = None) -> tuple[int, str]:
    """The latest checkpoint, signing a fresh one first when records (or ``seq``) are past it."""
    latest = await asyncio.to_thread(audit.latest)
    if latest is None or latest[0] < audit.frontier.size or (seq is not None and latest[0] <= seq):
        await audit.checkpoint_now()
        latest = await asyncio.to_thread(audit.latest)
    return latest


@router.get("/v1/audit/checkpoint")
async def checkpoint(request: Request):
    audit = audit_of(request)
    size, note = await covered(audit)
    return checkpoint_document(size, note, audit.key.verifier)


@router.get("/v1/audit/consistency")
async def consistency(request: Request):
    audit = audit_of(request)
    sizes = {}
    for name in ("from", "to"):
        raw = request.query_params.get(name)
        if raw is None or not raw.isdigit():
            raise ClientError(f"'{name}' must be a checkpoint's size (a whole number)", param=name)
        sizes[name] = int(raw)
    if sizes["from"] > sizes["to"]:
        raise ClientError("'from' must not be larger than 'to'", param="from")
    notes = {}
    for name, size in sizes.items():
        row = await asyncio.to_thread(audit.store.checkpoint_at, size)
        if row is None:
            raise NotFoundError(f"no signed checkpoint of size {size} (GET /v1/audit/checkpoint gives the latest)",
                                param=name)
        notes[name] = (size, row[2])
    return await asyncio.to_thread(consistency_document, notes["from"], notes["to"], audit.node)


@router.get("/v1/audit/records")
async def list_records(request: Request):
    audit = audit_of(request)
    qp = request.query_params
    try:
        since, until = parse_time(qp.get("since")), parse_time(qp.get("until"))
    except ValueError as e:
        raise ClientError(str(e), param="since" if "since" in qp else "until") from None
    limit = _int(qp.get("limit"), "limit", 50, 1, 500)
    cursor = _int(qp.get("cursor"), "cursor", None, 0, None)
    rows = await asyncio.to_thread(audit.store.list_records, since, until, cursor, limit)
    data = []
    for r in rows:
        rec = json.loads(r.entry)
        data.append({"id": r.id, "seq": r.seq, "time": iso(r.time), "kind": r.kind, "status": r.status,
                     "model": r.model, "key_id": r.key_id, "explanations": len(rec.get("explanations") or []),
                     "preview": _preview(rec)})
    return {"object": "list", "data": data, "next_cursor": rows[-1].seq if len(rows) == limit else None}


@router.get("/v1/audit/records/{record_id}")
async def get_record(record_id: str, request: Request):
    audit = audit_of(request)
    row = await asyncio.to_thread(audit.store.record_by_id, record_id)
    if row is None:
        raise NotFoundError(f"no record with id {record_id!r} (never recorded, or deleted by retention)",
                            param="record_id")
    latest = await covered(audit, row.seq)
    return await asyncio.to_thread(record_document, row, audit.node, latest, audit.key.verifier)


@router.get("/v1/audit/search")
async def search(request: Request):
    """The same search as ``nla-serve audit search`` (store/search.py): same hits, order, snippets."""
    audit = audit_of(request)
    try:
        query = parse_query(request.query_params)
    except QueryError as e:
        raise ClientError(str(e), param=e.param) from None
    return await asyncio.to_thread(search_log, audit.store, query)


def _int(raw: str | None, name: str, default, lo: int, hi: int | None):
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < lo or (hi is not None and int(raw) > hi):
        raise ClientError(f"'{name}' must be a whole number from {lo}" + (f" to {hi}" if hi else ""), param=name)
    return int(raw)


def _preview(rec: dict) -> str:
    choices = rec.get("choices") or []
    text = choices[0].get("text") if choices else ""
    return (text or "")[:120]
