"""The audit store's schema versions and migrations, on SQLite and on a real PostgreSQL server:
a log written by the release before versioning (tests/data/audit_v1.sql, its `sqlite3 .dump`;
audit_v1_postgres.sql, that release's PostgreSQL DDL) opens, is migrated, verifies and searches;
migration 1 is that release's schema exactly; a later migration runs once, in a transaction; a
newer or half-made schema is refused. And the CLI's search is the search function's."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from nla_serve.audit.note import Verifier
from nla_serve.audit.record import iso
from nla_serve.audit.store import SchemaError, SearchQuery, find_hits, open_store, search_log
from nla_serve.audit.store import schema as store_schema
from nla_serve.audit.store import search as search_module
from nla_serve.audit.verify import verify_log

DATA = Path(__file__).parent / "data"
FIXTURE = json.loads((DATA / "audit_v1.json").read_text(encoding="utf-8"))
CLI = [str(Path(sys.executable).with_name("nla-serve")), "audit"]
COLUMNS = {"meta": "k, v", "records": "seq, id, time, kind, status, model, key_id, entry, sig",
           "tree": "level, idx, hash", "checkpoints": "size, time, note",
           "texts": "seq, record_id, time, model, key_id, source, choice_index, token_index, token, status, fve, "
                    "grounding, monitors, text"}


def old_sqlite(path: Path) -> str:
    """The previous release's log, rebuilt from its dump."""
    con = sqlite3.connect(path)
    con.executescript((DATA / "audit_v1.sql").read_text(encoding="utf-8"))
    con.close()
    return str(path)


def old_postgres(postgres, tmp_path: Path) -> str:
    """The same log on PostgreSQL: that release's DDL, then the fixture's rows in their order."""
    src = sqlite3.connect(old_sqlite(tmp_path / "source.db"))
    dsn = postgres.new_database()
    with psycopg.connect(dsn) as c:
        c.execute((DATA / "audit_v1_postgres.sql").read_text(encoding="utf-8"))
        for table, cols in COLUMNS.items():
            rows = src.execute(f"SELECT {cols} FROM {table} ORDER BY {'rowid' if table == 'texts' else '1, 2'}")
            marks = ", ".join(["%s"] * len(cols.split(",")))
            with c.cursor() as cur:
                cur.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})", rows.fetchall())
    src.close()
    return dsn


@pytest.fixture(params=["sqlite", "postgresql"])
def old_log(request, tmp_path) -> str:
    if request.param == "sqlite":
        return old_sqlite(tmp_path / "audit.db")
    return old_postgres(request.getfixturevalue("postgres"), tmp_path)


def raw(where: str, sql: str, args=()) -> list:
    """Read the database behind the store's back."""
    if where.startswith("postgresql://"):
        with psycopg.connect(where) as c:
            return c.execute(sql.replace("?", "%s"), args).fetchall()
    con = sqlite3.connect(where)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def version(where: str) -> str | None:
    r = raw(where, "SELECT v FROM meta WHERE k = 'schema'")
    return r[0][0] if r else None


def check_whole_log(store) -> None:
    rep = verify_log(store, Verifier.parse(FIXTURE["verifier_key"]), [FIXTURE["latest_checkpoint"]])
    assert rep.ok, rep.problems
    assert (rep.size, rep.records, rep.pruned) == (FIXTURE["size"], FIXTURE["records_present"], FIXTURE["pruned"])
    assert rep.checkpoints >= 4
    assert rep.search_rows == store.rows("SELECT COUNT(*) FROM texts")[0][0] == 12  # every row, each as signed


def test_a_log_of_the_previous_release_opens_migrated_verifies_and_searches(old_log):
    store = open_store(old_log)
    assert store.meta("schema") == str(store_schema.newest())
    check_whole_log(store)
    assert store.record_by_id("chatcmpl-fixture-0") is None  # deleted by retention, as it was
    assert json.loads(store.record_by_id("chatcmpl-fixture-5").entry)["monitor_events"][0]["rule"] == "tested"
    page = search_log(store, SearchQuery(q='"being tested"', monitor="tested"))
    assert [h["request_id"] for h in page["data"]] == ["chatcmpl-fixture-5", "chatcmpl-fixture-1"]
    s, e = page["data"][0]["match"]
    assert page["data"][0]["snippet"][s:e] == "being tested" and page["next_cursor"] is None
    assert [h.row.record_id for h in find_hits(store, SearchQuery(q="天气"))] == ["cmpl-fixture-2"]  # below a trigram
    assert [h.row.record_id for h in find_hits(store, SearchQuery(q="OCEANS", source="vector"))] == ["expl-fixture-3"]
    outputs = find_hits(store, SearchQuery(source="output", key_id="bob", limit=200))
    assert sorted(h.row.text for h in outputs) == ["I cannot say.", "four five", "one two three"]
    store.close()
    reopened = open_store(old_log)  # a migrated log opens as it is
    check_whole_log(reopened)
    reopened.close()


def test_a_previous_release_log_with_edited_search_rows_fails_verify(old_log):
    """Its search rows are derived again from its signed records, as the writer of that release stored them."""
    store = open_store(old_log)
    store.execute("UPDATE texts SET monitors = '', text = 'the assistant answers' "
                  "WHERE seq = 6 AND source = 'completion'")
    store.execute("DELETE FROM texts WHERE seq = 3 AND source = 'output' AND choice_index = 1")
    store.conn.commit()
    rep = verify_log(store, Verifier.parse(FIXTURE["verifier_key"]), [FIXTURE["latest_checkpoint"]])
    assert rep.problems == [
        "the search row of record #3 (id cmpl-fixture-2), output of choice 1, is missing: search cannot find "
        "'four five'",
        "the search row of record #6 (id chatcmpl-fixture-5), completion explanation of choice 0 token 2, says "
        "monitors '' and text 'the assistant answers' but the signed record says monitors ',tested,' and text "
        "'the assistant is being tested again'"]
    store.close()


def structure(where: str) -> list:
    """The schema as the database itself describes it, whitespace aside."""
    if where.startswith("postgresql://"):
        cols = raw(where, "SELECT table_name, column_name, data_type, is_nullable, column_default FROM "
                          "information_schema.columns WHERE table_schema = current_schema() ORDER BY 1, 2")
        idx = raw(where, "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() ORDER BY 1")
        ext = raw(where, "SELECT extname FROM pg_extension ORDER BY 1")
        return cols + idx + ext
    return [(t, n, " ".join((s or "").split())) for t, n, s in
            raw(where, "SELECT type, name, sql FROM sqlite_master ORDER BY type, name")]


def fresh_database(old_log: str, tmp_path: Path, request, name: str) -> str:
    if old_log.startswith("postgresql://"):
        return request.getfixturevalue("postgres").new_database()
    return str(tmp_path / f"{name}.db")


def test_migration_1_is_the_previous_release_schema_exactly(old_log, tmp_path, request, monkeypatch):
    fresh = fresh_database(old_log, tmp_path, request, "fresh")
    with monkeypatch.context() as m:
        m.setattr(store_schema, "MIGRATIONS", store_schema.MIGRATIONS[:1])
        open_store(fresh).close()
    assert version(fresh) == "1" == version(old_log)
    assert structure(fresh) == structure(old_log)
    assert len(structure(fresh)) > 10


def test_a_migrated_old_log_has_the_schema_of_a_new_one(old_log, tmp_path, request):
    fresh = fresh_database(old_log, tmp_path, request, "fresh")
    open_store(fresh).close()
    open_store(old_log).close()
    assert version(fresh) == version(old_log) == str(store_schema.newest())
    assert structure(fresh) == structure(old_log)
    assert any("claims" in str(x) for x in structure(fresh))


def counting(calls: list, name: str, then=None):
    def apply(store):
        calls.append(name)
        if then is not None:
            then(store)
    return apply


def add_kind_index(store):
    store.execute("CREATE INDEX records_kind ON records (kind)")


def test_a_new_migration_runs_exactly_once_on_an_old_log(old_log, monkeypatch):
    calls: list[str] = []
    n = store_schema.newest() + 1
    monkeypatch.setattr(store_schema, "MIGRATIONS", [
        *store_schema.MIGRATIONS, store_schema.Migration(n, "test: an index on kind", counting(calls, "next",
                                                                                                add_kind_index))])
    store = open_store(old_log)
    assert calls == ["next"] and version(old_log) == str(n)
    check_whole_log(store)
    assert [h.row.record_id for h in find_hits(store, SearchQuery(q="oceans"))] == ["expl-fixture-3"]
    store.close()
    for _ in range(2):
        open_store(old_log).close()
    assert calls == ["next"] and version(old_log) == str(n)  # not again
    if old_log.startswith("postgresql://"):
        assert raw(old_log, "SELECT 1 FROM pg_indexes WHERE indexname = 'records_kind'")
    else:
        assert raw(old_log, "SELECT 1 FROM sqlite_master WHERE name = 'records_kind'")


def test_a_failed_migration_changes_nothing(old_log, monkeypatch):
    def half_then_fail(store):
        store.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("the last migration failed")

    good = list(store_schema.MIGRATIONS)
    monkeypatch.setattr(store_schema, "MIGRATIONS", [*good, store_schema.Migration(store_schema.newest() + 1, "fails",
                                                                                    half_then_fail)])
    with pytest.raises(RuntimeError, match="the last migration failed"):
        open_store(old_log)
    assert version(old_log) == "1"
    tables = "SELECT tablename FROM pg_tables" if old_log.startswith("postgresql://") else \
        "SELECT name FROM sqlite_master"
    assert not {"half_done", "claims"} & {r[0] for r in raw(old_log, tables)}  # the transaction rolled back, whole
    monkeypatch.setattr(store_schema, "MIGRATIONS", good)
    check_whole_log(open_store(old_log))


def test_a_log_without_its_version_row_is_recognised_by_its_tables(old_log, monkeypatch):
    """A log that never wrote ``schema`` (its tables are the first release's) is version 1:
    migration 1 is not run again, the later ones are."""
    if old_log.startswith("postgresql://"):
        with psycopg.connect(old_log) as c:
            c.execute("DELETE FROM meta WHERE k = 'schema'")
    else:
        con = sqlite3.connect(old_log)
        con.execute("DELETE FROM meta WHERE k = 'schema'")
        con.commit()
        con.close()
    calls: list[str] = []
    monkeypatch.setattr(store_schema, "MIGRATIONS", [
        store_schema.Migration(m.version, m.summary, counting(calls, f"v{m.version}", m.apply))
        for m in store_schema.MIGRATIONS])
    check_whole_log(open_store(old_log))
    assert calls == [f"v{m.version}" for m in store_schema.MIGRATIONS[1:]] and calls
    assert version(old_log) == str(store_schema.newest())


def test_a_fresh_database_gets_every_migration_once(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(store_schema, "MIGRATIONS", [
        store_schema.Migration(m.version, m.summary, counting(calls, f"v{m.version}", m.apply))
        for m in store_schema.MIGRATIONS])
    db = str(tmp_path / "new.db")
    open_store(db).close()
    open_store(db).close()
    assert calls == [f"v{m.version}" for m in store_schema.MIGRATIONS] and version(db) == str(store_schema.newest())


def test_a_newer_or_half_made_schema_is_refused(tmp_path):
    newer = old_sqlite(tmp_path / "newer.db")
    con = sqlite3.connect(newer)
    con.execute("UPDATE meta SET v = '99' WHERE k = 'schema'")
    con.commit()
    con.close()
    with pytest.raises(SchemaError, match="schema version 99"):
        open_store(newer)
    half = tmp_path / "half.db"
    con = sqlite3.connect(half)
    con.execute("CREATE TABLE records (seq INTEGER PRIMARY KEY)")
    con.close()
    with pytest.raises(SchemaError, match="some of the audit tables"):
        open_store(str(half))


def test_search_writes_times_as_records_do():
    for t in (0.0, 1767225600.123456, 1796626284.8394148):
        assert search_module.iso(t) == iso(t)


def test_the_cli_search_is_the_search_function(tmp_path):
    """`nla-serve audit search --json` prints the hits `search` returns (the API's body), page by page."""
    db = old_sqlite(tmp_path / "audit.db")
    store = open_store(db)
    for flags, query in [(["tested"], {"q": "tested"}), (["--source", "output"], {"source": "output"}),
                         (["a", "--limit", "3"], {"q": "a", "limit": 3}),
                         (["--key-id", "alice", "--fve-min", "0.4", "--limit", "2"],
                          {"key_id": "alice", "fve_min": 0.4, "limit": 2})]:
        cursor, pages = None, 0
        while True:
            extra = [] if cursor is None else ["--cursor", str(cursor)]
            out = subprocess.run(CLI + ["search", "--audit-db", db, "--json", *flags, *extra], capture_output=True,
                                 text=True)
            assert out.returncode == 0, out.stderr
            page = search_log(store, SearchQuery(**query, cursor=cursor))
            assert [json.loads(line) for line in out.stdout.splitlines()] == page["data"]
            pages += 1
            if page["next_cursor"] is None:
                break
            assert f"--cursor {page['next_cursor']}" in out.stderr
            cursor = page["next_cursor"]
        assert pages >= (2 if query.get("limit") in (2, 3) else 1)
