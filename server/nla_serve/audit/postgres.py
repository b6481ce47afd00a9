"""The audit store on PostgreSQL, for several replicas sharing one log (psycopg 3).

Appends serialize on a transaction-scoped advisory lock, inside which the size is read, so the
replicas' records interleave into one tree. Search uses ``pg_trgm`` (a GIN trigram index and
``ILIKE``): the same substring semantics as SQLite's trigram FTS5, in any script.
"""

from __future__ import annotations

from nla_serve.audit.store import SCHEMA_VERSION, Hit, SearchQuery, Store, like_escape

LOCK_ID = 0x6E6C6173  # "nlas": the log's advisory lock


class PostgresStore(Store):
    dialect = "postgresql"

    def __init__(self, dsn: str):
        super().__init__()
        self.dsn = dsn

    def connect(self):
        import psycopg

        return psycopg.connect(self.dsn, autocommit=False)

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def executemany(self, text: str, rows: list) -> None:
        with self.conn.cursor() as cur:  # psycopg 3 has executemany on cursors only
            cur.executemany(self.sql(text), rows)

    def create(self) -> None:
        c = self.conn
        c.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID + 1,))  # replicas starting together
        try:
            c.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
            for stmt in [
                "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
                "CREATE TABLE IF NOT EXISTS records (seq BIGINT PRIMARY KEY, id TEXT NOT NULL, "
                "time DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL, model TEXT, key_id TEXT, "
                "entry BYTEA NOT NULL, sig BYTEA NOT NULL)",
                "CREATE INDEX IF NOT EXISTS records_id ON records (id)",
                "CREATE INDEX IF NOT EXISTS records_time ON records (time)",
                "CREATE TABLE IF NOT EXISTS tree (level INTEGER NOT NULL, idx BIGINT NOT NULL, hash BYTEA NOT NULL, "
                "PRIMARY KEY (level, idx))",
                "CREATE TABLE IF NOT EXISTS checkpoints (size BIGINT PRIMARY KEY, time DOUBLE PRECISION NOT NULL, "
                "note TEXT NOT NULL)",
                "CREATE TABLE IF NOT EXISTS texts (id BIGSERIAL PRIMARY KEY, seq BIGINT NOT NULL, "
                "record_id TEXT NOT NULL, time DOUBLE PRECISION NOT NULL, model TEXT, key_id TEXT, "
                "source TEXT NOT NULL, choice_index INTEGER, token_index INTEGER, token TEXT, status TEXT, "
                "fve DOUBLE PRECISION, grounding DOUBLE PRECISION, monitors TEXT NOT NULL, text TEXT NOT NULL)",
                "CREATE INDEX IF NOT EXISTS texts_seq ON texts (seq)",
                "CREATE INDEX IF NOT EXISTS texts_time ON texts (time)",
                "CREATE INDEX IF NOT EXISTS texts_record ON texts (record_id)",
                "CREATE INDEX IF NOT EXISTS texts_trgm ON texts USING gin (text gin_trgm_ops)",
            ]:
                c.execute(stmt)
            c.commit()
        finally:
            c.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID + 1,))
            c.commit()
        self.set_meta_once("schema", SCHEMA_VERSION)

    def set_meta_once(self, key: str, value: str) -> str:
        self.execute("INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT (k) DO NOTHING", (key, value))
        self.conn.commit()
        return self.meta(key)

    def begin_append(self) -> int:
        self._local.writing = True
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
        return int(self.conn.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM tree WHERE level = 0").fetchone()[0])

    def search(self, q: SearchQuery) -> list[Hit]:
        where, args = self._filters(q)
        for term in q.terms():
            where.append("t.text ILIKE ? ESCAPE '\\'")
            args.append("%" + like_escape(term) + "%")
        sql = (f"SELECT t.id, {self._TEXT_COLS} FROM texts t WHERE {' AND '.join(where) or 'TRUE'} "
               "ORDER BY t.id DESC LIMIT ?")
        return [self._hit(r) for r in self.rows(sql, (*args, q.limit))]
