"""The audit store on PostgreSQL, for several replicas sharing one log (psycopg 3).

What it adds to base.py: ``%s`` placeholders, reads that end their transaction at once (no idle
snapshot), and two advisory locks: appends serialize on a transaction-scoped one, inside which
the size is read, so the replicas' records interleave into one tree; migrations on another, so
replicas starting together migrate once. Search uses ``pg_trgm`` (a GIN trigram index and
``ILIKE``): the same substring semantics as SQLite's trigram FTS5, in any script.
"""

from __future__ import annotations

from nla_serve.audit.store.base import Store
from nla_serve.audit.store.search import like_escape

LOCK_ID = 0x6E6C6173  # "nlas": the log's advisory lock; LOCK_ID + 1 guards the schema


class PostgresStore(Store):
    dialect = "postgresql"
    text_key = "id"
    end_reads = True
    like = "ILIKE"

    def __init__(self, dsn: str):
        super().__init__()
        self.dsn = dsn

    def connect(self):
        import psycopg  # only where a log is on PostgreSQL

        return psycopg.connect(self.dsn, autocommit=False)

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def executemany(self, text: str, rows: list) -> None:
        with self.conn.cursor() as cur:  # psycopg 3 has executemany on cursors only
            cur.executemany(self.sql(text), rows)

    def table_names(self) -> set[str]:
        return {r[0] for r in self.rows("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}

    def begin_schema(self) -> None:
        self._local.writing = True
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID + 1,))

    def begin_append(self) -> int:
        self._local.writing = True
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
        return int(self.conn.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM tree WHERE level = 0").fetchone()[0])

    def match_terms(self, terms: list[str]) -> tuple[str, list[str], list]:
        return ("texts t", ["t.text ILIKE ? ESCAPE '\\'" for _ in terms],
                ["%" + like_escape(term) + "%" for term in terms])
