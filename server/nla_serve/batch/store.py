"""Durable state of files and batches: one SQLite database (WAL), or PostgreSQL when replicas
share it (``postgresql://...``, as the audit log), one connection per thread.

A line's result is written in one transaction with its state, so after a crash every line is
either answered (kept, never run again) or pending (run again from the start: its first attempt
left no result and no audit record, which is written only when an answer completes). The output
and error files are built from the stored results at the end, in line order, each line once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# one schema, two spellings of a binary column and an ordering key
SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_files (
    id TEXT PRIMARY KEY, key_id TEXT, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, content {blob} NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq {serial}, id TEXT NOT NULL UNIQUE, key_id TEXT, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, request TEXT NOT NULL,
    state TEXT NOT NULL, status_code INTEGER, result TEXT, PRIMARY KEY (batch_id, line));
CREATE INDEX IF NOT EXISTS batch_lines_pending ON batch_lines (batch_id, state, line)
"""
DIALECTS = {"sqlite": {"blob": "BLOB", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"},
            "postgresql": {"blob": "BYTEA", "serial": "BIGSERIAL PRIMARY KEY"}}
LOCK_ID = 0x6E6C6162  # "nlab": serializes writers on PostgreSQL (the audit log's is "nlas")


@dataclass
class FileRow:
    id: str
    key_id: str | None
    purpose: str
    filename: str
    bytes: int
    created_at: int


class _Conn:
    """A connection that takes ``?`` placeholders on either backend, and says whom it serves."""

    def __init__(self, raw, postgres: bool):
        self.raw = raw
        self.postgres = postgres

    def execute(self, sql: str, args: tuple | list = ()):
        if self.postgres:
            return self.raw.execute(sql.replace("?", "%s").replace(" IS %s", " IS NOT DISTINCT FROM %s"), args)
        return self.raw.execute(sql, args)

    def executemany(self, sql: str, rows: list) -> None:
        if self.postgres:
            with self.raw.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)
        else:
            self.raw.executemany(sql, rows)


class BatchStore:
    def __init__(self, location: str | Path):
        self.location = str(location)
        self.postgres = self.location.startswith(("postgresql://", "postgres://"))
        if not self.postgres:
            Path(self.location).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[_Conn] = []  # every thread's connection, closed together
        self._lock = threading.Lock()
        schema = SCHEMA.format(**DIALECTS["postgresql" if self.postgres else "sqlite"])
        self._tx(lambda c: [c.execute(stmt) for stmt in schema.split(";") if stmt.strip()])

    def _conn(self) -> _Conn:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.postgres:
                import psycopg

                conn = _Conn(psycopg.connect(self.location, autocommit=True), True)
            else:
                raw = sqlite3.connect(self.location, timeout=30, isolation_level=None, check_same_thread=False)
                raw.execute("PRAGMA journal_mode=WAL")
                raw.execute("PRAGMA synchronous=FULL")  # a line's answer survives a power cut, not only a kill
                conn = _Conn(raw, False)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _tx(self, fn):
        """``fn(conn)`` in one transaction that holds the writers' lock (so a status read and its
        change cannot interleave with another writer's, in this process or another replica)."""
        c = self._conn()
        c.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")
        try:
            if self.postgres:
                c.execute("SELECT pg_advisory_xact_lock(?)", (LOCK_ID,))
            out = fn(c)
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
        return out

    # -- files -----------------------------------------------------------------------------------
    def add_file(self, row: FileRow, content: bytes) -> None:
        self._tx(lambda c: c.execute("INSERT INTO batch_files VALUES (?, ?, ?, ?, ?, ?, ?)",
                                     (row.id, row.key_id, row.purpose, row.filename, row.bytes, row.created_at,
                                      content)))

    def file(self, file_id: str) -> FileRow | None:
        r = self._conn().execute("SELECT id, key_id, purpose, filename, bytes, created_at FROM batch_files WHERE id = ?",
                                 (file_id,)).fetchone()
        return FileRow(*r) if r else None

    def file_content(self, file_id: str) -> bytes | None:
        r = self._conn().execute("SELECT content FROM batch_files WHERE id = ?", (file_id,)).fetchone()
        return bytes(r[0]) if r else None

    def files(self, key_id: str | None, purpose: str | None, limit: int) -> list[FileRow]:
        q = "SELECT id, key_id, purpose, filename, bytes, created_at FROM batch_files WHERE key_id IS ?"
        args: list = [key_id]
        if purpose is not None:
            q += " AND purpose = ?"
            args.append(purpose)
        q += " ORDER BY created_at DESC, id DESC LIMIT ?"
        return [FileRow(*r) for r in self._conn().execute(q, (*args, limit)).fetchall()]

    def delete_file(self, file_id: str) -> bool:
        return self._tx(lambda c: c.execute("DELETE FROM batch_files WHERE id = ?", (file_id,)).rowcount) > 0

    # -- batches ---------------------------------------------------------------------------------
    def add_batch(self, doc: dict, key_id: str | None, requests: list[tuple[str, dict]]) -> None:
        def write(c):
            c.execute("INSERT INTO batches (id, key_id, doc) VALUES (?, ?, ?)", (doc["id"], key_id, json.dumps(doc)))
            c.executemany("INSERT INTO batch_lines VALUES (?, ?, ?, ?, 'pending', NULL, NULL)",
                          [(doc["id"], i, cid, json.dumps(req)) for i, (cid, req) in enumerate(requests)])
        self._tx(write)

    def batch(self, batch_id: str) -> tuple[dict, str | None] | None:
        r = self._conn().execute("SELECT doc, key_id FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return (json.loads(r[0]), r[1]) if r else None

    def batches(self, key_id: str | None, after: str | None, limit: int) -> list[dict]:
        """One page of the key's batches, newest first: those older than ``after`` (an id of the
        same key; any other id gives an empty page), at most ``limit``, paged in SQL."""
        sql, args = "SELECT doc FROM batches WHERE key_id IS ?", [key_id]
        if after is not None:
            sql += " AND seq < (SELECT seq FROM batches WHERE id = ? AND key_id IS ?)"
            args += [after, key_id]
        rows = self._conn().execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def unfinished(self) -> list[dict]:
        """Batches a runner must (re)take: started and not yet ended, in creation order."""
        rows = self._conn().execute("SELECT doc FROM batches ORDER BY seq").fetchall()
        return [d for d in map(json.loads, (r[0] for r in rows))
                if d["status"] in ("validating", "in_progress", "finalizing", "cancelling")]

    def end(self, batch_id: str, **fields) -> dict:
        """End a batch in one transaction with reading its state: ``cancelled`` when it was being
        cancelled (a cancel that raced the last line still wins), else ``completed``."""
        def write(c):
            doc = json.loads(c.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])
            end = ({"status": "cancelled", "cancelled_at": now()} if doc["status"] == "cancelling"
                   else {"status": "completed", "completed_at": now()})
            doc.update(fields, **end)
            c.execute("UPDATE batches SET doc = ? WHERE id = ?", (json.dumps(doc), batch_id))
            return doc
        return self._tx(write)

    def advance(self, batch_id: str, allowed: tuple[str, ...], **fields) -> dict:
        """Set ``fields`` only if the batch's status is one of ``allowed``, in one transaction with
        reading it (the runner and a cancel race on the status); the batch document after it."""
        def write(c):
            doc = json.loads(c.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])
            if doc["status"] in allowed:
                doc.update(fields)
                c.execute("UPDATE batches SET doc = ? WHERE id = ?", (json.dumps(doc), batch_id))
            return doc
        return self._tx(write)

    def pending(self, batch_id: str, limit: int, skip: set[int]) -> list[tuple[int, str, dict]]:
        rows = self._conn().execute("SELECT line, custom_id, request FROM batch_lines WHERE batch_id = ? AND state = "
                                    "'pending' ORDER BY line LIMIT ?", (batch_id, limit + len(skip))).fetchall()
        return [(n, cid, json.loads(req)) for n, cid, req in rows if n not in skip][:limit]

    def answer(self, batch_id: str, line: int, status_code: int, result: dict) -> dict:
        """Store a line's result (once: a line already answered is left alone) and the batch's
        counts, in one transaction; the batch document after it."""
        def write(c):
            done = c.execute("UPDATE batch_lines SET state = 'done', status_code = ?, result = ? WHERE batch_id = ? "
                             "AND line = ? AND state = 'pending'",
                             (status_code, json.dumps(result), batch_id, line)).rowcount
            doc = json.loads(c.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])
            if done:
                counts = doc["request_counts"]
                counts["completed" if 200 <= status_code < 300 else "failed"] += 1
                c.execute("UPDATE batches SET doc = ? WHERE id = ?", (json.dumps(doc), batch_id))
            return doc
        return self._tx(write)

    def results(self, batch_id: str) -> list[tuple[int, str, int, dict]]:
        rows = self._conn().execute("SELECT line, custom_id, status_code, result FROM batch_lines WHERE batch_id = ? AND "
                                    "state = 'done' ORDER BY line", (batch_id,)).fetchall()
        return [(n, cid, code, json.loads(res)) for n, cid, code, res in rows]

    def progress(self) -> dict[str, int]:
        """Lines of unfinished batches by state: pending, completed (2xx), failed (the rest)."""
        ids = [d["id"] for d in self.unfinished()]
        out = {"pending": 0, "completed": 0, "failed": 0}
        for batch_id in ids:
            for state, ok, n in self._conn().execute(
                    "SELECT state, status_code BETWEEN 200 AND 299, COUNT(*) FROM batch_lines WHERE batch_id = ? "
                    "GROUP BY state, status_code BETWEEN 200 AND 299", (batch_id,)).fetchall():
                key = "pending" if state == "pending" else ("completed" if ok else "failed")
                if state in ("pending", "done"):
                    out[key] += n
        return out

    def close(self) -> None:
        """Close every thread's connection (the store is not used after)."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.raw.close()
            except Exception:  # closing from another thread: SQLite may refuse; the process ends soon
                pass


def now() -> int:
    return int(time.time())
