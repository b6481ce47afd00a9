"""The audit store's shared half: connections, the write path, and every read, in portable SQL.

A backend subclass (sqlite.py, postgres.py) says how it differs, and the code here never asks which
one it is: ``connect``, ``sql`` (its placeholder style), ``executemany``, ``end_reads`` (end a read's
transaction at once), ``table_names``, ``begin_schema`` and ``begin_append`` (its locks),
``match_terms`` (how search terms match), and the attributes ``dialect`` (which SQL the schema's
migrations write), ``text_key`` (the texts table's key) and ``like`` (its case-insensitive LIKE).

Writers go through ``begin_append`` / ``write`` / ``commit`` only: ``begin_append`` takes the log's
write lock (``BEGIN IMMEDIATE`` / an advisory lock), so that several processes can share one log,
and reads the size inside it. Each thread has its own connection.
"""

from __future__ import annotations

import threading
from typing import Iterator, Sequence

from nla_serve.audit.store.claims import INSERT as INSERT_CLAIM
from nla_serve.audit.store.claims import entry_claims, values_of
from nla_serve.audit.store.rows import Batch, ClaimRow, RecordRow, TextRow
from nla_serve.audit.store.schema import upgrade
from nla_serve.audit.store.search import searchable


class Store:
    """What both backends share: the write path and every query, in portable SQL with ``?``."""

    dialect: str = ""  # the schema's name for the backend's SQL ("sqlite", "postgresql")
    text_key: str = ""  # the texts table's key column: orders search hits, and is the search cursor
    end_reads: bool = False  # commit after each read outside a write (no snapshot held while idle)
    like: str = "LIKE"  # how search matches words inside a claim (search.py): any case, as the backend can

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock_connections = threading.Lock()
        self._connections: list = []

    # -- what a backend provides ----------------------------------------------------------------
    def connect(self):  # pragma: no cover - per backend
        raise NotImplementedError

    def table_names(self) -> set[str]:  # pragma: no cover - per backend
        raise NotImplementedError

    def begin_schema(self) -> None:
        """Start the schema transaction, holding the lock that keeps other openers out."""
        raise NotImplementedError  # pragma: no cover

    def begin_append(self) -> int:
        """Take the log's write lock; return its size (the next leaf index) inside the lock."""
        raise NotImplementedError  # pragma: no cover

    def match_terms(self, terms: list[str]) -> tuple[str, list[str], list]:
        """Search terms (all must occur) as (FROM clause holding ``texts t``, WHERE clauses, args)."""
        raise NotImplementedError  # pragma: no cover

    def sql(self, text: str) -> str:
        return text

    def executemany(self, text: str, rows: list) -> None:
        self.conn.executemany(self.sql(text), rows)

    # -- connections ----------------------------------------------------------------------------
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

    def execute(self, text: str, args: Sequence = ()):
        return self.conn.execute(self.sql(text), tuple(args))

    def rows(self, text: str, args: Sequence = ()) -> list:
        out = self.execute(text, args).fetchall()
        if self.end_reads and not getattr(self._local, "writing", False):
            self.conn.commit()  # end the read transaction: no idle-in-transaction snapshots
        return out

    def commit(self) -> None:
        self._local.writing = False
        self.conn.commit()

    def rollback(self) -> None:
        self._local.writing = False
        self.conn.rollback()

    # -- schema ---------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Create the tables, or bring an older database's to this release (schema.py); the version."""
        return upgrade(self)

    def meta(self, key: str) -> str | None:
        r = self.rows("SELECT v FROM meta WHERE k = ?", (key,))
        return r[0][0] if r else None

    def set_meta_once(self, key: str, value: str) -> str:
        """Store ``value`` unless the key has one; return the stored value."""
        self.execute("INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT (k) DO NOTHING", (key, value))
        self.conn.commit()
        return self.meta(key)

    # -- the write path -------------------------------------------------------------------------
    def size_unlocked(self) -> int:
        r = self.rows("SELECT COALESCE(MAX(idx) + 1, 0) FROM tree WHERE level = 0")
        return int(r[0][0])

    def write(self, batch: Batch) -> None:
        """Inside ``begin_append``'s transaction; the caller commits."""
        if batch.prune_through is not None:
            self.execute("DELETE FROM claims WHERE seq <= ?", (batch.prune_through,))
            self.execute("DELETE FROM texts WHERE seq <= ?", (batch.prune_through,))
            # retention records stay: they are what tells ``verify`` which deletions were lawful
            self.execute("DELETE FROM records WHERE seq <= ? AND kind != 'retention'", (batch.prune_through,))
        if batch.records:
            self.executemany("INSERT INTO records (seq, id, time, kind, status, model, key_id, entry, sig) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             [(r.seq, r.id, r.time, r.kind, r.status, r.model, r.key_id, r.entry, r.sig)
                              for r in batch.records])
        if batch.nodes:
            self.executemany("INSERT INTO tree (level, idx, hash) VALUES (?, ?, ?)", batch.nodes)
        if batch.texts:
            self.insert_texts(batch.texts, batch.records)
        if batch.checkpoint is not None:
            # another replica may have signed this very size already: both notes say the same
            self.execute("INSERT INTO checkpoints (size, time, note) VALUES (?, ?, ?) ON CONFLICT (size) DO NOTHING",
                         batch.checkpoint)

    _INSERT_TEXT = ("INSERT INTO texts (seq, record_id, time, model, key_id, source, choice_index, token_index, "
                    "token, status, fve, grounding, monitors, text) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

    def insert_texts(self, texts: list[TextRow], records: list[RecordRow] = ()) -> None:
        """The search rows, in order, and the claim rows of ``records``' explanations (claims.py):
        an explanation with claims is inserted alone, for its key; the others in runs."""
        claimed = {(r.seq, c.ordinal): c for r in records for c in entry_claims(r.entry)}
        place: dict[int, int] = {}  # seq -> rows of that record so far
        run: list[tuple] = []
        claim_rows: list[ClaimRow] = []
        for t in texts:
            n = place[t.seq] = place.get(t.seq, -1) + 1
            values = (t.seq, t.record_id, t.time, t.model, t.key_id, t.source, t.choice_index, t.token_index,
                      searchable(t.token), t.status, t.fve, t.grounding, t.monitors, searchable(t.text))
            c = claimed.get((t.seq, n))
            if c is None or not c.fits(t.source, t.choice_index, t.token_index):
                run.append(values)
                continue
            if run:
                self.executemany(self._INSERT_TEXT, run)
                run = []
            key = self.execute(self._INSERT_TEXT + f" RETURNING {self.text_key}", values).fetchone()[0]
            claim_rows += c.rows(t.seq, int(key))
        if run:
            self.executemany(self._INSERT_TEXT, run)
        if claim_rows:
            self.executemany(INSERT_CLAIM, [values_of(c) for c in claim_rows])

    # -- reads ----------------------------------------------------------------------------------
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
        for clause, value in (("time >= ?", since), ("time < ?", until), ("seq > ?", after_seq)):
            if value is not None:
                where.append(clause)
                args.append(value)
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

    _TEXT_COLS = ("seq, record_id, time, model, key_id, source, choice_index, token_index, token, status, fve, "
                  "grounding, monitors, text")

    def iter_texts(self, batch: int = 5000) -> Iterator[TextRow]:
        """Every search row in (seq, key) order, as stored, a batch at a time (verification compares
        them, record by record, with the rows the signed records give)."""
        key = self.text_key
        where, args = "1 = 1", ()
        while True:
            chunk = self.rows(f"SELECT {key}, {self._TEXT_COLS} FROM texts WHERE {where} "
                              f"ORDER BY seq, {key} LIMIT ?", (*args, batch))
            if not chunk:
                return
            for r in chunk:
                yield TextRow(int(r[1]), *r[2:])  # as stored: a tampered value keeps its type
            last_key, last_seq = chunk[-1][0], chunk[-1][1]
            # the next rows after (seq, key): ``seq >= ?`` keeps the seq index usable on both backends
            where, args = f"seq >= ? AND (seq > ? OR {key} > ?)", (last_seq, last_seq, last_key)

    def iter_claims(self, batch: int = 5000) -> Iterator[tuple]:
        """Every claim row in (seq, key) order, as stored, with the texts row it is tied to (its seq,
        source, choice_index, token_index and text; None when there is no such row): (seq, parent
        seq, source, choice_index, token_index, parent text, idx, verdict, support, text)."""
        key = self.text_key
        where, args = "1 = 1", ()
        while True:
            chunk = self.rows(f"SELECT c.{key}, c.seq, t.seq, t.source, t.choice_index, t.token_index, t.text, c.idx, "
                              f"c.verdict, c.support, c.text FROM claims c LEFT JOIN texts t ON t.{key} = c.text_row "
                              f"WHERE {where} ORDER BY c.seq, c.{key} LIMIT ?", (*args, batch))
            if not chunk:
                return
            for r in chunk:
                yield tuple(r[1:])
            last_key, last_seq = chunk[-1][0], chunk[-1][1]
            where, args = f"c.seq >= ? AND (c.seq > ? OR c.{key} > ?)", (last_seq, last_seq, last_key)

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
