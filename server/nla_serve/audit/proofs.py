"""Proof documents: what ``GET /v1/audit/records/{id}``, ``/v1/audit/consistency`` and
``nla-serve audit show/export`` return, each checkable offline with ``nla-serve audit verify-proof``
and the public key alone (verify.py)."""

from __future__ import annotations

import json

from nla_serve.audit import merkle
from nla_serve.audit.note import NoteError, Verifier, open_checkpoint
from nla_serve.audit.store import RecordRow
from nla_serve.audit.verify import b64


def record_document(row: RecordRow, node: merkle.NodeReader, checkpoint: tuple[int, str] | None,
                    verifier: Verifier) -> dict:
    """The record, its entry and signature, and its inclusion proof in ``checkpoint`` (size, note);
    ``proof`` is null (with why) when no checkpoint covers the record yet."""
    doc = {"id": row.id, "seq": row.seq, "record": json.loads(row.entry), "entry": b64(row.entry),
           "leaf_hash": b64(merkle.leaf_hash(row.entry)), "signature": b64(row.sig), "verifier_key": str(verifier)}
    if checkpoint is None or checkpoint[0] <= row.seq:
        doc["proof"] = None
        doc["proof_reason"] = "no signed checkpoint covers this record yet (one is signed every few seconds)"
        return doc
    size, note = checkpoint
    doc["proof"] = {"leaf_index": row.seq, "tree_size": size,
                    "hashes": [b64(h) for h in merkle.inclusion_proof(row.seq, size, node)], "checkpoint": note}
    return doc


def consistency_document(old: tuple[int, str], new: tuple[int, str], node: merkle.NodeReader) -> dict:
    return {"from": old[1], "to": new[1], "from_size": old[0], "to_size": new[0],
            "hashes": [b64(h) for h in merkle.consistency_proof(old[0], new[0], node)] if old[0] else []}


def checkpoint_document(size: int, note: str, verifier: Verifier) -> dict:
    try:
        cp = open_checkpoint(note, verifier)
        root = b64(cp.root)
    except NoteError:
        root = None
    return {"origin": verifier.name, "size": size, "root": root, "checkpoint": note, "verifier_key": str(verifier)}
