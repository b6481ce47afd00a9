"""Search by claim verdict, on SQLite and a real PostgreSQL server: the claims of explanations
(store/claims.py) become rows tied to their explanation's search row, written with the record,
filled in by migration 2 for records written before it, deleted by retention, found by
``verdict`` (with the words inside one claim) through the search function and the CLI alike, and
derived again from the signed records by ``verify``, which names each claim row that differs, is
missing, or belongs to no record."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nla_serve.audit.log import AuditLog
from nla_serve.audit.note import LogKey
from nla_serve.audit.store import QueryError, SearchQuery, find_hits, open_store, parse_query, search_log
from nla_serve.audit.verify import verify_log

CLI = [str(Path(sys.executable).with_name("nla-serve")), "audit"]


def claim(text: str, support: float | None, verdict: str | None) -> dict:
    return {"text": text, "support": support, "verdict": verdict}


def record(i: int) -> dict:
    """Two explanations with claims (the second's verdicts vary with i), one without, and an answer."""
    whales = "The text is about whales. The model is being tested."
    scripture = "Archaic scripture prose. Nothing else stands out."
    return {
        "v": 1, "id": f"chatcmpl-{i:04d}", "kind": "chat", "status": "completed", "model": "tiny", "key_id": "alice",
        "params": {}, "prompt": {"messages": [{"role": "user", "content": f"question {i}"}]},
        "choices": [{"index": 0, "text": f"answer {i}", "token_ids": [1], "finish_reason": "stop"}],
        "explanations": [
            {"choice_index": 0, "token_index": 4, "source": "completion", "status": "ok", "text": whales,
             "fve": 0.3, "monitors": [], "claims": [claim("The text is about whales.", 0.12, "supported"),
                                                    claim("The model is being tested.", -0.03, "unsupported")]},
            {"choice_index": 0, "token_index": 5, "source": "completion", "status": "ok", "text": "no claims asked",
             "fve": 0.1, "monitors": []},
            {"choice_index": 0, "token_index": 6, "source": "completion", "status": "ok", "text": scripture,
             "fve": 0.2, "monitors": [],
             "claims": [claim("Archaic scripture prose.", -0.2, "contradicted" if i % 2 else None),
                        claim("Nothing else stands out.", None, None)]}]}


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "audit.db")
    return request.getfixturevalue("postgres").new_database()


def fill(tmp_path: Path, where: str, records: list[dict]) -> LogKey:
    key = LogKey.load_or_create(tmp_path / "log.key")
    log = AuditLog(open_store(where), key, checkpoint_file=tmp_path / "latest-checkpoint").open()

    async def go():
        await asyncio.gather(*[log.append(r) for r in records])
        await log.checkpoint_now()

    asyncio.run(go())
    log.close()
    return key


def verify(key: LogKey, where: str, tmp_path: Path):
    return verify_log(open_store(where), key.verifier, [(tmp_path / "latest-checkpoint").read_text()])


def tamper(where: str, *statements) -> None:
    store = open_store(where)
    for sql, args in statements:
        store.execute(sql, args)
    store.conn.commit()
    store.close()


def hits(store, **query) -> list[tuple[str, int]]:
    return [(h.row.record_id, h.row.token_index) for h in find_hits(store, SearchQuery(limit=200, **query))]


def test_search_by_verdict_finds_explanations_with_such_a_claim_and_words_inside_it(tmp_path, where):
    key = fill(tmp_path, where, [record(i) for i in range(4)])
    store = open_store(where)
    assert store.rows("SELECT COUNT(*) FROM claims")[0][0] == 16
    assert sorted(hits(store, verdict="supported")) == [(f"chatcmpl-{i:04d}", 4) for i in range(4)]
    assert sorted(hits(store, verdict="contradicted")) == [("chatcmpl-0001", 6), ("chatcmpl-0003", 6)]
    # unknown: a claim with no verdict (record 0 and 2's scripture claims; every "Nothing else" claim)
    assert sorted(hits(store, verdict="unknown")) == [(f"chatcmpl-{i:04d}", 6) for i in range(4)]
    # the words must occur in a claim with that verdict, not anywhere in the explanation
    assert sorted(hits(store, q="whales", verdict="supported")) == [(f"chatcmpl-{i:04d}", 4) for i in range(4)]
    assert hits(store, q="tested", verdict="supported") == []  # "being tested" is the unsupported claim
    assert len(hits(store, q="TESTED", verdict="unsupported")) == 4  # any case
    assert hits(store, q="whales tested", verdict="supported") == []  # both words in one claim
    assert len(hits(store, q="whales tested")) == 4  # without verdict: anywhere in the explanation
    assert hits(store, q="scripture", verdict="unknown", request_id="chatcmpl-0001") == []
    assert hits(store, verdict="supported", source="output") == []
    # the hits list the claims that made them hits; the page is the API's and the CLI's
    page = search_log(store, SearchQuery(q="scripture", verdict="contradicted"))
    assert [h["claims"] for h in page["data"]] == [[claim("Archaic scripture prose.", -0.2, "contradicted")]] * 2
    plain = search_log(store, SearchQuery(q="scripture"))
    assert plain["data"] and all("claims" not in h for h in plain["data"])
    with pytest.raises(QueryError, match="verdict") as e:
        parse_query({"verdict": "true"})
    assert e.value.param == "verdict"
    rep = verify(key, where, tmp_path)
    assert rep.ok and rep.search_rows == 16, rep.problems


def test_the_cli_search_by_verdict_is_the_search_function(tmp_path):
    db = str(tmp_path / "audit.db")
    fill(tmp_path, db, [record(i) for i in range(5)])
    store = open_store(db)
    for flags, query in [(["--verdict", "supported"], {"verdict": "supported"}),
                         (["scripture", "--verdict", "unknown", "--limit", "2"], {"q": "scripture", "verdict": "unknown",
                                                                                 "limit": 2})]:
        out = subprocess.run(CLI + ["search", "--audit-db", db, "--json", *flags], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert [json.loads(line) for line in out.stdout.splitlines()] == search_log(store, SearchQuery(**query))["data"]
    out = subprocess.run(CLI + ["search", "--audit-db", db, "whales", "--verdict", "supported"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "claim [supported, support +0.120]: The text is about whales." in out.stdout
    out = subprocess.run(CLI + ["search", "--audit-db", db, "--verdict", "maybe"], capture_output=True, text=True)
    assert out.returncode != 0 and "verdict" in out.stderr


EXPLANATION = "SELECT rowid FROM texts WHERE seq = 2 AND token_index = {}"  # rowid: "id" on PostgreSQL
CLAIM_TAMPERING = {
    # case: (statements, the problems verify must report)
    "verdict": ([("UPDATE claims SET verdict = 'supported' WHERE seq = 2 AND verdict = 'unsupported'", ())],
                ["the claim row of record #2 (id chatcmpl-0002), claim 1 of the completion explanation of choice 0 "
                 "token 4, says verdict 'supported' but the signed record says 'unsupported'"]),
    "support": ([("UPDATE claims SET support = 0.5 WHERE seq = 2 AND idx = 0 AND verdict = 'supported'", ())],
                ["the claim row of record #2 (id chatcmpl-0002), claim 0 of the completion explanation of choice 0 "
                 "token 4, says support 0.5 but the signed record says 0.12"]),
    "missing": ([("DELETE FROM claims WHERE seq = 2 AND verdict = 'supported'", ())],
                ["the claim row of record #2 (id chatcmpl-0002), claim 0 of the completion explanation of choice 0 "
                 "token 4, is missing: search by verdict cannot find 'The text is about whales.'"]),
    "extra": ([("INSERT INTO claims (seq, text_row, idx, verdict, support, text) SELECT seq, text_row, 7, "
                "'supported', 0.9, 'whales' FROM claims WHERE seq = 2 AND verdict = 'supported'", ())],
              ["record #2 (id chatcmpl-0002) has an extra claim row, claim 7 of the completion explanation of choice 0 "
               "token 4, saying 'whales', that its signed record does not hold"]),
    "moved": ([(f"UPDATE claims SET text_row = ({EXPLANATION.format(5)}) WHERE seq = 2 AND verdict = 'supported'",
                ())],
              ["record #2 (id chatcmpl-0002) has an extra claim row, claim 0 of the completion explanation of choice 0 "
               "token 5, saying 'The text is about whales.', that its signed record does not hold",
               "the claim row of record #2 (id chatcmpl-0002), claim 0 of the completion explanation of choice 0 token "
               "4, is missing: search by verdict cannot find 'The text is about whales.'"]),
    "invented": ([("INSERT INTO claims (seq, text_row, idx, verdict, support, text) VALUES (99, 12345, 0, 'supported', "
                   "0.5, 'a claim never made')", ())],
                 ["record #99 is not in the log, but its claim row, claim 0 of no search row, remains, saying "
                  "'a claim never made'"]),
}


@pytest.mark.parametrize("case", sorted(CLAIM_TAMPERING))
def test_a_tampered_claim_row_fails_verify_naming_the_record(tmp_path, where, case):
    key = fill(tmp_path, where, [record(i) for i in range(4)])
    assert verify(key, where, tmp_path).ok
    statements, expect = CLAIM_TAMPERING[case]
    if where.startswith("postgresql://"):
        statements = [(sql.replace("SELECT rowid", "SELECT id"), args) for sql, args in statements]
    tamper(where, *statements)
    assert verify(key, where, tmp_path).problems == expect


def test_a_claim_tied_to_another_explanation_with_the_same_place_is_caught(tmp_path):
    """Two raw vectors of one record share source, choice and token index (none): a claim moved from
    one to the other is caught by its text, which the other explanation does not hold."""
    db = str(tmp_path / "audit.db")
    rec = record(0) | {"kind": "explanations", "choices": []}
    rec["explanations"] = [{"index": n, "status": "ok", "text": text, "fve": 0.1, "monitors": [],
                            "claims": [claim(text, 0.1, "supported")]} for n, text in enumerate(("Alpha.", "Beta."))]
    key = fill(tmp_path, db, [rec])
    assert verify(key, db, tmp_path).ok
    assert [h["claims"][0]["text"] for h in search_log(open_store(db), SearchQuery(verdict="supported"))["data"]] == [
        "Beta.", "Alpha."]
    tamper(db, ("UPDATE claims SET text_row = (SELECT MIN(rowid) FROM texts) WHERE text = 'Beta.'", ()))
    assert verify(key, db, tmp_path).problems == [
        "the claim row of record #0 (id chatcmpl-0000), claim 0 of the vector explanation, is tied to a search row "
        "whose text does not hold it"]


def test_retention_deletes_the_claims_of_the_records_it_deletes(tmp_path, where):
    key = fill(tmp_path, where, [record(i) for i in range(6)])
    store = open_store(where)
    log = AuditLog(store, key, checkpoint_file=tmp_path / "latest-checkpoint").open()
    log.prune(store.record_at(2).time + 1e-6)
    asyncio.run(log.checkpoint_now())
    log.close()
    store = open_store(where)
    gone = {r.seq for r in store.iter_records()}
    assert store.rows("SELECT COUNT(*) FROM claims")[0][0] == 4 * (len(gone) - 1)  # the retention record has none
    assert verify(key, where, tmp_path).ok
    kept = store.rows("SELECT MIN(seq) FROM claims")[0][0]
    tamper(where, ("INSERT INTO claims (seq, text_row, idx, verdict, support, text) VALUES (1, 1, 0, 'supported', "
                   "0.1, 'left behind')", ()))
    assert kept >= 3 and verify(key, where, tmp_path).problems == [
        "record #1 was deleted by retention, but its claim row, claim 0 of no search row, remains, saying "
        "'left behind'"]


def test_migration_2_fills_the_claims_of_records_written_before_it(tmp_path, where):
    """A log written before claims were rows (version 1, its records' entries holding claims) is
    migrated: the rows are derived from the signed entries, search finds them, verify agrees."""
    key = fill(tmp_path, where, [record(i) for i in range(5)])
    store = open_store(where)
    tied = (f"SELECT c.seq, t.token_index, c.idx, c.verdict, c.support, c.text FROM claims c JOIN texts t "
            f"ON t.{store.text_key} = c.text_row")  # each claim with the explanation it is tied to
    expected = sorted(map(tuple, store.rows(tied)), key=repr)
    for index in ("claims_seq", "claims_text_row", "claims_verdict"):
        store.execute(f"DROP INDEX {index}")
    store.execute("DROP TABLE claims")
    store.execute("UPDATE meta SET v = '1' WHERE k = 'schema'")
    store.conn.commit()
    store.close()
    store = open_store(where)
    assert store.meta("schema") == "2"
    assert sorted(map(tuple, store.rows(tied)), key=repr) == expected
    assert len(expected) == 20 and len(hits(store, verdict="supported")) == 5
    assert verify(key, where, tmp_path).ok
