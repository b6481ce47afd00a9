"""OpenAI's objects for files and batches, and the output and error files of a finished batch."""

from __future__ import annotations

import hashlib
import json
import uuid

from nla_serve.batch.store import BatchStore, FileRow, now

COMPLETION_WINDOW = "24h"


def file_object(row: FileRow) -> dict:
    return {"id": row.id, "object": "file", "bytes": row.bytes, "created_at": row.created_at,
            "filename": row.filename, "purpose": row.purpose, "status": "processed", "status_details": None}


def new_batch(input_file_id: str, endpoint: str, total: int, metadata: dict | None) -> dict:
    created = now()
    return {"id": "batch_" + uuid.uuid4().hex, "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": COMPLETION_WINDOW, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": created, "in_progress_at": None,
            "expires_at": created + 24 * 3600, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": total, "completed": 0, "failed": 0}, "metadata": metadata}


def output_line(batch_id: str, line: int, custom_id: str, status: int, result: dict) -> str:
    # a stable id per line: the same line of the same batch has the same id however often it is read
    line_id = "batch_req_" + hashlib.sha256(f"{batch_id}/{line}".encode()).hexdigest()[:32]
    return json.dumps({"id": line_id, "custom_id": custom_id,
                       "response": {"status_code": status, "request_id": result.get("request_id"),
                                    "body": result["body"]}, "error": None}, ensure_ascii=False)


def finish_files(store: BatchStore, doc: dict, key_id: str | None) -> dict:
    """Write the output file (2xx answers) and the error file (the rest), in line order, and end
    the batch: ``completed``, or ``cancelled`` when it was being cancelled."""
    doc = store.advance(doc["id"], ("in_progress",), status="finalizing", finalizing_at=now())
    ok, failed = [], []
    for line, custom_id, status, result in store.results(doc["id"]):
        (ok if 200 <= status < 300 else failed).append(output_line(doc["id"], line, custom_id, status, result))
    ids = {}
    for name, lines in (("output", ok), ("error", failed)):
        if not lines:
            continue
        content = ("\n".join(lines) + "\n").encode()
        row = FileRow("file-" + uuid.uuid4().hex, key_id, "batch_output", f"{doc['id']}_{name}.jsonl", len(content),
                      now())
        store.add_file(row, content)
        ids[f"{name}_file_id"] = row.id
    return store.end(doc["id"], **ids)
