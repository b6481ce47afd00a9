"""The audit log's database: SQLite (embedded, the default) or PostgreSQL (several replicas).

    rows.py      the rows read and written (RecordRow, TextRow, ClaimRow, Batch)
    schema.py    the tables, described once, and the numbered migrations; the version in ``meta``
    claims.py    the claims of explanations as rows, derived from signed entries (search by verdict)
    base.py      Store: connections, the write path and every read, in portable SQL
    sqlite.py    SQLiteStore: WAL, BEGIN IMMEDIATE, FTS5 trigram search
    postgres.py  PostgresStore: advisory locks, pg_trgm search
    search.py    the query model and the one search that the API and the CLI both answer with

``open_store`` picks the backend from the location (a ``postgresql://`` DSN, else a file path) and
migrates the database before anything reads it. The names importers use live here.
"""

from __future__ import annotations

from pathlib import Path

from nla_serve.audit.store.base import Store
from nla_serve.audit.store.claims import VERDICTS, Claimed, entry_claims, explanation_claims
from nla_serve.audit.store.postgres import PostgresStore
from nla_serve.audit.store.rows import Batch, ClaimRow, RecordRow, TextRow
from nla_serve.audit.store.schema import MIGRATIONS, Migration, SchemaError, newest
from nla_serve.audit.store.search import (Hit, QueryError, SearchQuery, find_hits, like_escape, parse_query,
                                          parse_time, search_log, searchable, snippet)
from nla_serve.audit.store.sqlite import SQLiteStore

__all__ = ["Batch", "ClaimRow", "Claimed", "Hit", "MIGRATIONS", "Migration", "PostgresStore", "QueryError",
           "RecordRow", "SQLiteStore", "SchemaError", "SearchQuery", "Store", "TextRow", "VERDICTS", "entry_claims",
           "explanation_claims", "find_hits", "is_dsn", "like_escape", "newest", "open_store", "parse_query",
           "parse_time", "search_log", "searchable", "snippet"]


def is_dsn(where: str) -> bool:
    """A PostgreSQL connection string rather than a SQLite file path."""
    return where.startswith(("postgresql://", "postgres://"))


def open_store(where: str) -> Store:
    """``postgresql://...`` -> PostgreSQL; anything else is a SQLite file path. Migrated on open."""
    store: Store = PostgresStore(where) if is_dsn(where) else SQLiteStore(Path(where).expanduser())
    store.migrate()
    return store
