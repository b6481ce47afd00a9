"""The embedded audit store: one SQLite file in WAL mode with ``synchronous=FULL``, so a committed
batch survives kill -9 and power loss and readers never block the writer. What it adds to base.py:
``BEGIN IMMEDIATE`` as the write and schema lock, and search through the FTS5 trigram index
(substrings in any script; terms under three characters, below a trigram, use ``LIKE``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from nla_serve.audit.store.base import Store
from nla_serve.audit.store.search import like_escape


class SQLiteStore(Store):
    dialect = "sqlite"
    text_key = "rowid"

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    def connect(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        c = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        c.execute("PRAGMA foreign_keys=OFF")
        return _AutoTx(c)

    def table_names(self) -> set[str]:
        return {r[0] for r in self.rows("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def begin_schema(self) -> None:
        self.conn.raw.execute("BEGIN IMMEDIATE")
        self._local.writing = True

    def begin_append(self) -> int:
        self.conn.raw.execute("BEGIN IMMEDIATE")
        self._local.writing = True
        return int(self.conn.raw.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM tree WHERE level = 0").fetchone()[0])

    def match_terms(self, terms: list[str]) -> tuple[str, list[str], list]:
        fts, likes = [], []
        for term in terms:
            # trigram FTS needs 3 characters; shorter terms (two CJK characters, say) use LIKE
            (fts if len(term) >= 3 else likes).append(term)
        where, args = [], []
        source = "texts t"
        if fts:
            source = "texts_fts JOIN texts t ON t.rowid = texts_fts.rowid"
            where.append("texts_fts MATCH ?")
            args.append(" AND ".join('"' + t.replace('"', '""') + '"' for t in fts))
        for term in likes:
            where.append("t.text LIKE ? ESCAPE '\\'")
            args.append("%" + like_escape(term) + "%")
        return source, where, args


class _AutoTx:
    """A sqlite3 connection in autocommit mode whose ``execute`` and ``commit`` behave like a
    DB-API connection for the shared code (reads outside a transaction, writes in one)."""

    def __init__(self, raw: sqlite3.Connection):
        self.raw = raw

    def execute(self, sql, args=()):
        return self.raw.execute(sql, args)

    def executemany(self, sql, rows):
        return self.raw.executemany(sql, rows)

    def commit(self):
        if self.raw.in_transaction:
            self.raw.execute("COMMIT")

    def rollback(self):
        if self.raw.in_transaction:
            self.raw.execute("ROLLBACK")

    def close(self):
        self.raw.close()
