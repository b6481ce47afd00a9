"""The audit tables and every query on them, for SQLite (embedded) and PostgreSQL (several replicas).

    records      seq (leaf index), id, time, kind, status, model, key_id, entry (canonical bytes), sig
    tree         every perfect subtree (level, idx, hash); level 0 are the leaf hashes, which stay
                 when retention deletes a record, so the tree and its checkpoints still verify
    checkpoints  size, time, signed note
    texts        one row per explanation and per output text, with the search filters; indexed by
                 SQLite FTS5 (trigram tokenizer: substrings, any script, CJK included) or
                 PostgreSQL pg_trgm (the same substring semantics, case-insensitive)
    meta         origin and verifier key of the log

Writers go through ``append_batch`` only, which takes the log's write lock (``BEGIN IMMEDIATE`` /
an advisory lock) so that several processes can share one log: the size is read inside the lock.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = "1"


@dataclass
class RecordRow:
    seq: int
    id: str
    time: float
    kind: str
    status: str
    model: str | None
    key_id: str | None
    entry: bytes
    sig: bytes


@dataclass
class TextRow:
    seq: int
    record_id: str
    time: float
    model: str | None
    key_id: str | None
    source: str  # "prompt" | "completion" (an explanation of a token there) | "output" (a choice's text)
    choice_index: int | None
    token_index: int | None
    token: str | None
    status: str | None
    fve: float | None
    grounding: float | None
    monitors: str  # ",rule,rule," so that a rule filter is one LIKE
    text: str


@dataclass
class Batch:
    """One group commit: records with their search texts, the tree nodes they completed, and
    maybe a checkpoint; ``prune_through`` deletes records ``<=`` that seq first (retention)."""

    records: list[RecordRow]
    texts: list[TextRow]
    nodes: list[tuple[int, int, bytes]]
    checkpoint: tuple[int, float, str] | None = None
    prune_through: int | None = None


class SearchQuery(BaseModel):
    """The filters of ``GET /v1/audit/search`` and ``nla-serve audit search``."""

    model_config = ConfigDict(extra="forbid")

    q: str | None = Field(default=None, max_length=512, description="words or phrases, all must occur (substring, any case)")
    since: float | None = Field(default=None, description="unix time or ISO 8601, inclusive")
    until: float | None = Field(default=None, description="unix time or ISO 8601, exclusive")
    model: str | None = None
    key_id: str | None = None
    status: str | None = None
    fve_min: float | None = None
    fve_max: float | None = None
    grounding_min: float | None = None
    grounding_max: float | None = None
    monitor: str | None = Field(default=None, description="a monitor rule's name")
    source: str | None = Field(default=None, pattern="^(prompt|completion|output|vector)$",
                               description="prompt | completion (explanations of tokens there), output (answers), vector")
    request_id: str | None = None
    limit: int = Field(default=20, ge=1, le=200)
    cursor: int | None = Field(default=None, ge=0, description="next_cursor of the previous page")

    @field_validator("since", "until", mode="before")
    @classmethod
    def _time(cls, v):
        return parse_time(v)

    @model_validator(mode="after")
    def _ranges(self):
        for lo, hi in (("fve_min", "fve_max"), ("grounding_min", "grounding_max"), ("since", "until")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{lo} ({a}) is above {hi} ({b})")
        return self

    def terms(self) -> list[str]:
        """Whitespace-separated terms; "double quotes" keep a phrase together."""
        if not self.q:
            return []
        q = searchable(self.q)
        return [a or b for a, b in re.findall(r'"([^"]+)"|(\S+)', q) if (a or b).strip()]


def searchable(text: str | None) -> str | None:
    """The search copy of a text: NUL becomes U+FFFD. PostgreSQL text cannot hold NUL and FTS5
    queries cannot either; the signed entry keeps the exact text, so records and proofs are exact."""
    return text.replace("\x00", "\ufffd") if text else text


def parse_time(v):
    """Unix seconds, or an ISO 8601 time (a date alone is its midnight UTC; no zone means UTC)."""
    if v is None or isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
        from datetime import datetime, timezone

        try:
            t = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{v!r} is neither unix seconds nor an ISO 8601 time") from None
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
    raise ValueError("a time is unix seconds or an ISO 8601 string")


def snippet(text: str, terms: list[str], width: int = 160) -> tuple[str, list[int] | None]:
    """A window of ``text`` around the first term found, and the match's [start, end) in it."""
    low = text.casefold()
    found = [(low.find(t.casefold()), len(t)) for t in terms]
    found = [f for f in found if f[0] >= 0]
    if not found:
        return (text[:width] + ("…" if len(text) > width else "")), None
    at, n = min(found)
    start = max(0, at - (width - n) // 2)
    end = min(len(text), start + width)
    start = max(0, end - width)
    prefix = "…" if start > 0 else ""
    out = prefix + text[start:end] + ("…" if end < len(text) else "")
    return out, [len(prefix) + at - start, len(prefix) + at - start + n]


@dataclass
class Hit:
    rowid: int
    row: TextRow


class Store:
    """What both backends share: the write path and every query, in portable SQL with ``?``."""

    dialect = "sqlite"
    BLOB = "BLOB"

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock_connections = threading.Lock()
        self._connections: list = []

    # -- connections --------------------------------------------------------------------------
    def connect(self):  # pragma: no cover - per backend
        raise NotImplementedError

    @property
    def conn(self):
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = self.connect()
            with self._lock_connections:
                self._connections.append(c)
        return c

    def close(self) -> None:
        with self._lock_connections:
            for c in self._connections:
                try:
                    c.close()
                except Exception:
                    pass
            self._connections.clear()
        self._local = threading.local()

    def sql(self, text: str) -> str:
        return text

    def execute(self, text: str, args: Sequence = ()):
        return self.conn.execute(self.sql(text), tuple(args))

    def executemany(self, text: str, rows: list) -> None:
        self.conn.executemany(self.sql(text), rows)

    def rows(self, text: str, args: Sequence = ()) -> list:
        cur = self.execute(text, args)
        out = cur.fetchall()
        if self.dialect == "postgresql" and not getattr(self._local, "writing", False):
            self.conn.commit()  # end the read transaction: no idle-in-transaction snapshots
        return out

    # -- schema -------------------------------------------------------------------------------
    def create(self) -> None:  # pragma: no cover - per backend
        raise NotImplementedError

    def meta(self, key: str) -> str | None:
        r = self.rows("SELECT v FROM meta WHERE k = ?", (key,))
        return r[0][0] if r else None

    def set_meta_once(self, key: str, value: str) -> str:
        """Store ``value`` unless the key has one; return the stored value."""
        existing = self.meta(key)
        if existing is not None:
            return existing
        self.execute("INSERT INTO meta (k, v) VALUES (?, ?)", (key, value))
        self.conn.commit()
        return value

    # -- the write path -----------------------------------------------------------------------
    def begin_append(self) -> int:
        """Take the log's write lock; return its size (the next leaf index) inside the lock."""
        raise NotImplementedError  # pragma: no cover

    def size_unlocked(self) -> int:
        r = self.rows("SELECT COALESCE(MAX(idx) + 1, 0) FROM tree WHERE level = 0")
        return int(r[0][0])

    def write(self, batch: Batch) -> None:
        """Inside ``begin_append``'s transaction; the caller commits."""
        c = self.conn
        if batch.prune_through is not None:
            c.execute(self.sql("DELETE FROM texts WHERE seq <= ?"), (batch.prune_through,))
            # retention records stay: they are what tells ``verify`` which deletions were lawful
            c.execute(self.sql("DELETE FROM records WHERE seq <= ? AND kind != 'retention'"), (batch.prune_through,))
        if batch.records:
            self.executemany("INSERT INTO records (seq, id, time, kind, status, model, key_id, entry, sig) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             [(r.seq, r.id, r.time, r.kind, r.status, r.model, r.key_id, r.entry, r.sig)
                              for r in batch.records])
        if batch.nodes:
            self.executemany("INSERT INTO tree (level, idx, hash) VALUES (?, ?, ?)", batch.nodes)
        if batch.texts:
            self.insert_texts(batch.texts)
        if batch.checkpoint is not None:
            # another replica may have signed this very size already: both notes say the same
            c.execute(self.sql("INSERT INTO checkpoints (size, time, note) VALUES (?, ?, ?) "
                               "ON CONFLICT (size) DO NOTHING"), batch.checkpoint)

    def insert_texts(self, texts: list[TextRow]) -> None:
        self.executemany((
            "INSERT INTO texts (seq, record_id, time, model, key_id, source, choice_index, token_index, token, "
            "status, fve, grounding, monitors, text) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
            [(t.seq, t.record_id, t.time, t.model, t.key_id, t.source, t.choice_index, t.token_index,
              searchable(t.token), t.status, t.fve, t.grounding, t.monitors, searchable(t.text)) for t in texts])

    def commit(self) -> None:
        self._local.writing = False
        self.conn.commit()

    def rollback(self) -> None:
        self._local.writing = False
        self.conn.rollback()

    # -- reads --------------------------------------------------------------------------------
    def node(self, level: int, idx: int) -> bytes:
        r = self.rows("SELECT hash FROM tree WHERE level = ? AND idx = ?", (level, idx))
        if not r:
            raise KeyError(f"tree node ({level}, {idx}) is missing")
        return bytes(r[0][0])

    _RECORD_COLS = "seq, id, time, kind, status, model, key_id, entry, sig"

    @staticmethod
    def _record(r) -> RecordRow:
        return RecordRow(int(r[0]), r[1], float(r[2]), r[3], r[4], r[5], r[6], bytes(r[7]), bytes(r[8]))

    def record_by_id(self, record_id: str) -> RecordRow | None:
        r = self.rows(f"SELECT {self._RECORD_COLS} FROM records WHERE id = ? ORDER BY seq LIMIT 1", (record_id,))
        return self._record(r[0]) if r else None

    def record_at(self, seq: int) -> RecordRow | None:
        r = self.rows(f"SELECT {self._RECORD_COLS} FROM records WHERE seq = ?", (seq,))
        return self._record(r[0]) if r else None

    def list_records(self, since: float | None, until: float | None, after_seq: int | None,
                     limit: int) -> list[RecordRow]:
        where, args = ["1 = 1"], []
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        if until is not None:
            where.append("time < ?")
            args.append(until)
        if after_seq is not None:
            where.append("seq > ?")
            args.append(after_seq)
        r = self.rows(f"SELECT {self._RECORD_COLS} FROM records WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
                      (*args, limit))
        return [self._record(x) for x in r]

    def iter_records(self, batch: int = 2000) -> Iterator[RecordRow]:
        """Every record row in seq order, as stored (verification reads them all)."""
        last = -1
        while True:
            chunk = self.rows(f"SELECT {self._RECORD_COLS} FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                              (last, batch))
            if not chunk:
                return
            for r in chunk:
                yield self._record(r)
            last = int(chunk[-1][0])

    def iter_leaves(self, batch: int = 20000) -> Iterator[tuple[int, bytes]]:
        last = -1
        while True:
            chunk = self.rows("SELECT idx, hash FROM tree WHERE level = 0 AND idx > ? ORDER BY idx LIMIT ?",
                              (last, batch))
            if not chunk:
                return
            for idx, h in chunk:
                yield int(idx), bytes(h)
            last = int(chunk[-1][0])

    def records_of_kind(self, kind: str) -> list[RecordRow]:
        return [self._record(x) for x in
                self.rows(f"SELECT {self._RECORD_COLS} FROM records WHERE kind = ? ORDER BY seq", (kind,))]

    def checkpoints(self) -> list[tuple[int, float, str]]:
        return [(int(s), float(t), n) for s, t, n in self.rows("SELECT size, time, note FROM checkpoints ORDER BY size")]

    def latest_checkpoint(self) -> tuple[int, float, str] | None:
        r = self.rows("SELECT size, time, note FROM checkpoints ORDER BY size DESC LIMIT 1")
        return (int(r[0][0]), float(r[0][1]), r[0][2]) if r else None

    def checkpoint_at(self, size: int) -> tuple[int, float, str] | None:
        r = self.rows("SELECT size, time, note FROM checkpoints WHERE size = ?", (size,))
        return (int(r[0][0]), float(r[0][1]), r[0][2]) if r else None

    def last_seq_before(self, when: float) -> int | None:
        r = self.rows("SELECT MAX(seq) FROM records WHERE time < ? AND kind != 'retention'", (when,))
        return None if r[0][0] is None else int(r[0][0])

    def count_records(self) -> int:
        return int(self.rows("SELECT COUNT(*) FROM records")[0][0])

    # -- search -------------------------------------------------------------------------------
    def _filters(self, q: SearchQuery, col: str = "t.") -> tuple[list[str], list]:
        where, args = [], []
        simple = [("since", "time >= ?"), ("until", "time < ?"), ("model", "model = ?"), ("key_id", "key_id = ?"),
                  ("status", "status = ?"), ("fve_min", "fve >= ?"), ("fve_max", "fve <= ?"),
                  ("grounding_min", "grounding >= ?"), ("grounding_max", "grounding <= ?"), ("source", "source = ?"),
                  ("request_id", "record_id = ?")]
        for name, clause in simple:
            value = getattr(q, name)
            if value is not None:
                where.append(col + clause)
                args.append(value)
        if q.monitor is not None:
            where.append(col + "monitors LIKE ? ESCAPE '\\'")
            args.append("%," + like_escape(q.monitor) + ",%")
        if q.cursor is not None:
            where.append(col + "rowid < ?" if self.dialect == "sqlite" else col + "id < ?")
            args.append(q.cursor)
        return where, args

    def search(self, q: SearchQuery) -> list[Hit]:  # pragma: no cover - per backend
        raise NotImplementedError

    _TEXT_COLS = ("t.seq, t.record_id, t.time, t.model, t.key_id, t.source, t.choice_index, t.token_index, t.token, "
                  "t.status, t.fve, t.grounding, t.monitors, t.text")

    @staticmethod
    def _hit(r) -> Hit:
        return Hit(int(r[0]), TextRow(int(r[1]), r[2], float(r[3]), r[4], r[5], r[6], r[7], r[8], r[9], r[10],
                                      r[11], r[12], r[13], r[14]))


def like_escape(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class SQLiteStore(Store):
    """The embedded store: WAL and ``synchronous=FULL``, so a committed batch survives kill -9
    and power loss; readers never block the writer."""

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

    def create(self) -> None:
        c = self.conn
        c.raw.executescript("""
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, time REAL NOT NULL,
                kind TEXT NOT NULL, status TEXT NOT NULL, model TEXT, key_id TEXT, entry BLOB NOT NULL,
                sig BLOB NOT NULL);
            CREATE INDEX IF NOT EXISTS records_id ON records (id);
            CREATE INDEX IF NOT EXISTS records_time ON records (time);
            CREATE TABLE IF NOT EXISTS tree (level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
                PRIMARY KEY (level, idx)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS checkpoints (size INTEGER PRIMARY KEY, time REAL NOT NULL, note TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS texts (rowid INTEGER PRIMARY KEY, seq INTEGER NOT NULL,
                record_id TEXT NOT NULL, time REAL NOT NULL, model TEXT, key_id TEXT, source TEXT NOT NULL,
                choice_index INTEGER, token_index INTEGER, token TEXT, status TEXT, fve REAL, grounding REAL,
                monitors TEXT NOT NULL, text TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS texts_seq ON texts (seq);
            CREATE INDEX IF NOT EXISTS texts_time ON texts (time);
            CREATE INDEX IF NOT EXISTS texts_record ON texts (record_id);
            CREATE VIRTUAL TABLE IF NOT EXISTS texts_fts USING fts5(text, content='texts', content_rowid='rowid',
                tokenize='trigram');
            CREATE TRIGGER IF NOT EXISTS texts_ai AFTER INSERT ON texts BEGIN
                INSERT INTO texts_fts (rowid, text) VALUES (new.rowid, new.text); END;
            CREATE TRIGGER IF NOT EXISTS texts_ad AFTER DELETE ON texts BEGIN
                INSERT INTO texts_fts (texts_fts, rowid, text) VALUES ('delete', old.rowid, old.text); END;
        """)
        self.set_meta_once("schema", SCHEMA_VERSION)

    def begin_append(self) -> int:
        self.conn.raw.execute("BEGIN IMMEDIATE")
        self._local.writing = True
        return int(self.conn.raw.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM tree WHERE level = 0").fetchone()[0])

    def search(self, q: SearchQuery) -> list[Hit]:
        where, args = self._filters(q)
        fts, likes = [], []
        for term in q.terms():
            # trigram FTS needs 3 characters; shorter terms (two CJK characters, say) use LIKE
            (fts if len(term) >= 3 else likes).append(term)
        for term in likes:
            where.append("t.text LIKE ? ESCAPE '\\'")
            args.append("%" + like_escape(term) + "%")
        if fts:
            match = " AND ".join('"' + t.replace('"', '""') + '"' for t in fts)
            sql = (f"SELECT t.rowid, {self._TEXT_COLS} FROM texts_fts JOIN texts t ON t.rowid = texts_fts.rowid "
                   f"WHERE texts_fts MATCH ? {''.join(' AND ' + w for w in where)} ORDER BY t.rowid DESC LIMIT ?")
            rows = self.rows(sql, (match, *args, q.limit))
        else:
            sql = (f"SELECT t.rowid, {self._TEXT_COLS} FROM texts t WHERE {' AND '.join(where) or '1 = 1'} "
                   "ORDER BY t.rowid DESC LIMIT ?")
            rows = self.rows(sql, (*args, q.limit))
        return [self._hit(r) for r in rows]


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


def open_store(where: str) -> Store:
    """``postgresql://...`` -> PostgreSQL; anything else is a SQLite file path."""
    if where.startswith(("postgresql://", "postgres://")):
        from nla_serve.audit.postgres import PostgresStore

        store: Store = PostgresStore(where)
    else:
        store = SQLiteStore(Path(where).expanduser())
    store.create()
    return store
