"""The audit tables, described once, and the numbered migrations that bring a database to them.

    records      seq (leaf index), id, time, kind, status, model, key_id, entry (canonical bytes), sig
    tree         every perfect subtree (level, idx, hash); level 0 are the leaf hashes, which stay
                 when retention deletes a record, so the tree and its checkpoints still verify
    checkpoints  size, time, signed note
    texts        one row per explanation and per output text, with the search filters; indexed by
                 SQLite FTS5 (trigram tokenizer: substrings, any script, CJK included) or
                 PostgreSQL pg_trgm (the same substring semantics, case-insensitive)
    meta         origin and verifier key of the log, and ``schema``: the schema version
    claims       (version 2) one row per claim of an explanation: its verdict, support and text,
                 tied to the explanation's texts row, for search by verdict (claims.py)

``TABLES`` and ``INDEXES`` are the one description of the tables (version 1's; later versions are
the steps after it); ``ddl`` writes it in each backend's types. ``MIGRATIONS`` is the ordered list of numbered steps, each a function of the store (SQL per
dialect inside it). The database records its version in ``meta`` (key ``schema``); ``upgrade`` runs
the missing steps and writes the new version in one transaction, under the backend's schema lock
(``Store.begin_schema``), so that replicas starting together migrate once. A database of the
first release is version 1 (it wrote ``schema = 1`` but never read it; without that row, its
tables say so). Migration 1 is that release's schema exactly: never change it, add a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nla_serve.audit.store.claims import backfill

# The tables as migration 1 creates them: (column, portable type, constraint); "key" is the texts
# table's own key (``Store.text_key``). Frozen: a later version is a later step (ALTER TABLE ...).
TABLES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "meta": (("k", "text", "PRIMARY KEY"), ("v", "text", "NOT NULL")),
    "records": (("seq", "bigint", "PRIMARY KEY"), ("id", "text", "NOT NULL"), ("time", "float", "NOT NULL"),
                ("kind", "text", "NOT NULL"), ("status", "text", "NOT NULL"), ("model", "text", ""),
                ("key_id", "text", ""), ("entry", "blob", "NOT NULL"), ("sig", "blob", "NOT NULL")),
    "tree": (("level", "int", "NOT NULL"), ("idx", "bigint", "NOT NULL"), ("hash", "blob", "NOT NULL"),
             ("PRIMARY KEY (level, idx)", "", "")),  # a table constraint: no type
    "checkpoints": (("size", "bigint", "PRIMARY KEY"), ("time", "float", "NOT NULL"), ("note", "text", "NOT NULL")),
    "texts": (("key", "serial", ""), ("seq", "bigint", "NOT NULL"), ("record_id", "text", "NOT NULL"),
              ("time", "float", "NOT NULL"), ("model", "text", ""), ("key_id", "text", ""),
              ("source", "text", "NOT NULL"), ("choice_index", "int", ""), ("token_index", "int", ""),
              ("token", "text", ""), ("status", "text", ""), ("fve", "float", ""), ("grounding", "float", ""),
              ("monitors", "text", "NOT NULL"), ("text", "text", "NOT NULL")),
}
INDEXES = (("records_id", "records", "id"), ("records_time", "records", "time"), ("texts_seq", "texts", "seq"),
           ("texts_time", "texts", "time"), ("texts_record", "texts", "record_id"))
TYPES = {
    "sqlite": {"int": "INTEGER", "bigint": "INTEGER", "float": "REAL", "text": "TEXT", "blob": "BLOB",
               "serial": "INTEGER PRIMARY KEY"},
    "postgresql": {"int": "INTEGER", "bigint": "BIGINT", "float": "DOUBLE PRECISION", "text": "TEXT",
                   "blob": "BYTEA", "serial": "BIGSERIAL PRIMARY KEY"},
}
# what each backend adds: the tree's storage, and the index that makes texts searchable
TABLE_SUFFIX = {"sqlite": {"tree": " WITHOUT ROWID"}, "postgresql": {}}
TEXT_SEARCH = {
    "sqlite": [
        "CREATE VIRTUAL TABLE IF NOT EXISTS texts_fts USING fts5(text, content='texts', content_rowid='rowid', "
        "tokenize='trigram')",
        "CREATE TRIGGER IF NOT EXISTS texts_ai AFTER INSERT ON texts BEGIN "
        "INSERT INTO texts_fts (rowid, text) VALUES (new.rowid, new.text); END",
        "CREATE TRIGGER IF NOT EXISTS texts_ad AFTER DELETE ON texts BEGIN "
        "INSERT INTO texts_fts (texts_fts, rowid, text) VALUES ('delete', old.rowid, old.text); END",
    ],
    "postgresql": [
        "CREATE EXTENSION IF NOT EXISTS pg_trgm",
        "CREATE INDEX IF NOT EXISTS texts_trgm ON texts USING gin (text gin_trgm_ops)",
    ],
}


class SchemaError(RuntimeError):
    """The database's schema is not one this release can use (newer, or half of one)."""


# Version 2: the claims of explanations ("key" again the backend's own key column, named like the
# texts table's; ``text_row`` holds the key of the explanation's texts row).
CLAIMS = (("key", "serial", ""), ("seq", "bigint", "NOT NULL"), ("text_row", "bigint", "NOT NULL"),
          ("idx", "int", "NOT NULL"), ("verdict", "text", ""), ("support", "float", ""), ("text", "text", "NOT NULL"))
CLAIMS_INDEXES = (("claims_seq", "claims", "seq"), ("claims_text_row", "claims", "text_row"),
                  ("claims_verdict", "claims", "verdict, text_row"))


def ddl(dialect: str, text_key: str, tables: dict = TABLES, indexes: tuple = INDEXES) -> list[str]:
    """The statements creating ``tables`` and ``indexes`` (version 1's by default) in ``dialect``
    (idempotent)."""
    types, suffix = TYPES[dialect], TABLE_SUFFIX[dialect]
    out = []
    for table, columns in tables.items():
        cols = []
        for name, kind, constraint in columns:
            name = text_key if name == "key" else name
            cols.append(" ".join(x for x in (name, types.get(kind, ""), constraint) if x))
        out.append(f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(cols)}){suffix.get(table, '')}")
    out += [f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({col})" for name, table, col in indexes]
    return out


def create_v1(store) -> None:
    """Version 1: the tables of the first release, and the backend's text search index."""
    for statement in ddl(store.dialect, store.text_key) + TEXT_SEARCH[store.dialect]:
        store.execute(statement)


def create_v2(store) -> None:
    """Version 2: the claims table, filled from the records already in the log (their signed
    entries, as the writer fills it from now on)."""
    for statement in ddl(store.dialect, store.text_key, {"claims": CLAIMS}, CLAIMS_INDEXES):
        store.execute(statement)
    backfill(store)


@dataclass(frozen=True)
class Migration:
    version: int
    summary: str
    apply: Callable[..., None]  # apply(store), inside the schema transaction; SQL per store.dialect


MIGRATIONS: list[Migration] = [
    Migration(1, "the first release's tables: records, tree, checkpoints, texts with their search index, meta",
              create_v1),
    Migration(2, "claims: each claim of an explanation with its verdict and support, for search by verdict; "
                 "filled from the signed records", create_v2),
]


def newest() -> int:
    return MIGRATIONS[-1].version


def version_of(store) -> int:
    """The database's schema version: its ``meta`` row; else 1 when it has the first release's
    tables (a log written before versions were read), 0 when it is empty."""
    tables = store.table_names()
    if "meta" in tables:
        marked = store.rows("SELECT v FROM meta WHERE k = 'schema'")
        if marked:
            return int(marked[0][0])
    present = set(TABLES) & tables
    if present == set(TABLES):
        return 1
    if present - {"meta"}:
        raise SchemaError(f"the database holds some of the audit tables ({', '.join(sorted(present))}) but not "
                          f"all, and no schema version: it is not an nla-serve audit log, or a damaged one")
    return 0


def upgrade(store) -> int:
    """Bring the database to the newest version; the version it has now. A database written by a
    newer release is refused rather than written to."""
    target = newest()
    if _known(version_of(store), target) == target:  # the common case, an up-to-date log, takes no lock
        return target
    store.begin_schema()
    try:
        have = _known(version_of(store), target)  # again inside the lock: another process may have migrated
        for m in MIGRATIONS:
            if m.version > have:
                m.apply(store)
        if have < target:
            store.execute("DELETE FROM meta WHERE k = 'schema'")
            store.execute("INSERT INTO meta (k, v) VALUES ('schema', ?)", (str(target),))
        store.commit()
    except BaseException:
        store.rollback()
        raise
    return target


def _known(have: int, target: int) -> int:
    if have > target:
        raise SchemaError(f"the audit database has schema version {have}; this nla-serve knows versions up to "
                          f"{target}: upgrade nla-serve to use it")
    return have
