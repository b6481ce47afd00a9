"""The audit log without a server: RFC 6962 vectors, proofs against adversarial input, signed
notes, the writer (group commit, checkpoints, retention) on a real SQLite file, and every kind
of tampering with the database detected and named."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nla_serve.audit import merkle
from nla_serve.audit.log import AuditLog
from nla_serve.audit.note import Checkpoint, LogKey, NoteError, Verifier, open_checkpoint
from nla_serve.audit.proofs import consistency_document, record_document
from nla_serve.audit.record import canonical
from nla_serve.audit.store import SearchQuery, find_hits, open_store
from nla_serve.audit.verify import verify_consistency_proof, verify_log, verify_record_proof

H = bytes.fromhex
CT_LEAVES = [H(x) for x in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                            "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]
# (leaf index, tree size, proof) and (old size, new size, proof) from certificate-transparency's tests
CT_INCLUSION = [(0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
                (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"])]
CT_CONSISTENCY = [(1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                          "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                          "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
                  (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                          "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                          "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
                  (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                          "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"])]


def ct_tree(n: int) -> merkle.MemoryTree:
    return merkle.MemoryTree([merkle.leaf_hash(x) for x in CT_LEAVES[:n]])


def test_rfc6962_roots_and_proofs_match_the_reference_vectors():
    for n in range(9):
        t = ct_tree(n)
        assert t.frontier.root().hex() == CT_ROOTS[n]
        assert merkle.root(n, t.node).hex() == CT_ROOTS[n]
    t = ct_tree(8)
    for index, size, proof in CT_INCLUSION:
        got = merkle.inclusion_proof(index, size, t.node)
        assert [h.hex() for h in got] == proof
        merkle.verify_inclusion(index, size, t.node(0, index), got, H(CT_ROOTS[size]))
    for old, new, proof in CT_CONSISTENCY:
        got = merkle.consistency_proof(old, new, t.node)
        assert [h.hex() for h in got] == proof
        merkle.verify_consistency(old, new, H(CT_ROOTS[old]), H(CT_ROOTS[new]), got)


def test_every_proof_of_every_shape_verifies_and_every_mutation_is_rejected():
    rng = random.Random(6962)
    leaves = [merkle.leaf_hash(bytes([i, i * 7 % 256])) for i in range(37)]
    t = merkle.MemoryTree(leaves)
    roots = {n: merkle.root(n, t.node) for n in range(38)}
    for size in range(1, 38):
        for i in range(size):
            proof = merkle.inclusion_proof(i, size, t.node)
            merkle.verify_inclusion(i, size, leaves[i], proof, roots[size])
            bad_attempts = [(i, size, leaves[i], proof + [leaves[0]]),  # too long
                            (i, size + 1, leaves[i], proof),  # wrong size
                            (i ^ 1 if size > 1 else i, size, leaves[i], proof),  # wrong index
                            (i, size, leaves[(i + 1) % 37], proof)]  # wrong leaf
            if proof:
                bad_attempts.append((i, size, leaves[i], proof[:-1]))  # too short
                flip = list(proof)
                k = rng.randrange(len(flip))
                flip[k] = bytes([flip[k][0] ^ 1]) + flip[k][1:]
                bad_attempts.append((i, size, leaves[i], flip))
            for args in bad_attempts:
                if args[1] > 37 or (args[0] == i and args[2] == leaves[i] and args[3] == proof and args[1] == size):
                    continue
                with pytest.raises(merkle.ProofError):
                    merkle.verify_inclusion(*args, roots[args[1]])
        for old in range(1, size + 1):
            proof = merkle.consistency_proof(old, size, t.node)
            merkle.verify_consistency(old, size, roots[old], roots[size], proof)
            if old < size:
                with pytest.raises(merkle.ProofError):
                    merkle.verify_consistency(old, size, roots[old], roots[size], proof[:-1])
                with pytest.raises(merkle.ProofError):  # a root that is not that log's
                    merkle.verify_consistency(old, size, roots[size], roots[size], proof)
                with pytest.raises(merkle.ProofError):
                    merkle.verify_consistency(old, size, roots[old], roots[old], proof)
    with pytest.raises(merkle.ProofError):  # the same size with two roots is a fork
        merkle.verify_consistency(5, 5, roots[5], roots[6], [])
    with pytest.raises(merkle.ProofError):  # a log never shrinks
        merkle.verify_consistency(6, 5, roots[6], roots[5], [])
    with pytest.raises(merkle.ProofError):  # hashes must be 32 bytes
        merkle.verify_inclusion(0, 2, leaves[0], [b"short"], roots[2])


def test_signed_notes_round_trip_and_reject_forgery(tmp_path):
    key = LogKey.load_or_create(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert LogKey.load_or_create(tmp_path / "k").verifier == key.verifier  # the same key next start
    v = Verifier.parse(str(key.verifier))
    assert v == key.verifier
    note = Checkpoint(key.origin, 12, b"\x07" * 32).sign(key)
    lines = note.split("\n")
    assert lines[0] == key.origin and lines[1] == "12" and lines[3] == "" and lines[4].startswith("\u2014 ")
    cp = open_checkpoint(note, v)
    assert (cp.size, cp.root) == (12, b"\x07" * 32)
    with pytest.raises(NoteError, match="does not verify"):
        open_checkpoint(note.replace("\n12\n", "\n13\n"), v)
    other = LogKey.load_or_create(tmp_path / "other", name=key.origin)  # same name, another key
    with pytest.raises(NoteError, match="no signature"):
        open_checkpoint(Checkpoint(key.origin, 12, b"\x07" * 32).sign(other), v)
    with pytest.raises(NoteError):
        Verifier.parse(str(key.verifier).replace("+", "+0", 1))
    # standard base64 has '+' in its alphabet: keys whose encoding holds one parse too (a key
    # with a '+' is one in about three; 40 keys make missing it vanishingly unlikely)
    keys = [LogKey.load_or_create(tmp_path / f"many{i}", name="n") for i in range(40)]
    assert any(str(k.verifier).count("+") > 2 for k in keys)
    assert all(Verifier.parse(str(k.verifier)) == k.verifier for k in keys)
    (tmp_path / "k").chmod(0o644)
    with pytest.raises(NoteError, match="chmod 600"):
        LogKey.load_or_create(tmp_path / "k")


def record(i: int, text: str | None = None) -> dict:
    return {"v": 1, "id": f"chatcmpl-{i:04d}", "kind": "chat", "status": "completed", "model": "tiny",
            "key_id": "alice" if i % 2 else "bob", "params": {"model": "tiny", "seed": 2**60},
            "prompt": {"messages": [{"role": "user", "content": f"question {i}"}]},
            "choices": [{"index": 0, "text": text or f"answer {i}", "token_ids": [1, 2, 3], "finish_reason": "stop"}],
            "explanations": [{"choice_index": 0, "token_index": 4, "source": "completion", "status": "ok",
                              "text": f"the assistant is being tested, item {i}" if i % 3 == 0 else
                              f"an ordinary reply about {'天气' if i % 3 == 1 else 'weather'} {i}",
                              "fve": (i % 10) / 10, "monitors": ["tested"] if i % 3 == 0 else [],
                              "activation_sha256": "ab" * 32}]}


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path) -> str:
    """Each store test runs on both backends: a SQLite file, and a fresh database on a real
    PostgreSQL server (conftest.PostgresServer)."""
    if request.param == "sqlite":
        return str(tmp_path / "audit.db")
    return request.getfixturevalue("postgres").new_database()


def fill(tmp_path, n: int, where: str | None = None, **kw) -> tuple[LogKey, str]:
    key = LogKey.load_or_create(tmp_path / "log.key")
    db = where or str(tmp_path / "audit.db")
    log = AuditLog(open_store(db), key, checkpoint_file=tmp_path / "latest-checkpoint", **kw).open()

    async def go():
        for start in range(0, n, 7):  # several batches
            await asyncio.gather(*[log.append(record(i)) for i in range(start, min(n, start + 7))])
        await log.checkpoint_now()

    asyncio.run(go())
    log.close()
    return key, db


def verify(key, db, tmp_path, extra=()):
    notes = [(tmp_path / "latest-checkpoint").read_text()] + list(extra)
    return verify_log(open_store(db), key.verifier, notes)


def test_the_writer_feeds_its_metrics_and_survives_a_broken_one(tmp_path):
    from nla_serve.metrics import Metrics

    metrics = Metrics("tiny")
    fill(tmp_path / "a", 9, metrics=metrics)
    text = metrics.render().decode()
    assert 'nla_audit_records_total{model_name="tiny",status="completed"} 9.0' in text
    assert 'nla_audit_batch_records_count{model_name="tiny"}' in text

    class Broken:  # every metric call raises: the records must still be written and acknowledged
        def __getattr__(self, name):
            def fail(*args):
                raise RuntimeError("metrics down")
            return fail

    key, db = fill(tmp_path / "b", 9, metrics=Broken())
    assert open_store(db).count_records() == 9


def test_records_are_signed_checkpointed_searchable_and_verify(tmp_path, where):
    key, db = fill(tmp_path, where=where, n=40, checkpoint_every=10)
    rep = verify(key, db, tmp_path)
    assert rep.ok, rep.problems
    assert rep.size == 40 and rep.records == 40 and rep.checkpoints >= 4
    store = open_store(db)
    entry = store.record_at(5).entry
    assert entry == canonical(json.loads(entry))  # the entry is its own canonical form
    assert json.loads(entry)["params"]["seed"] == str(2**60)  # beyond IEEE doubles: a string, not rounded
    hits = find_hits(store, SearchQuery(q="being tested", monitor="tested", key_id="bob", limit=200))
    assert hits and all("being tested" in h.row.text and h.row.key_id == "bob" for h in hits)
    assert {h.row.record_id for h in hits} == {f"chatcmpl-{i:04d}" for i in range(40) if i % 6 == 0}
    cjk = find_hits(store, SearchQuery(q="天气", limit=200))  # two CJK characters: below a trigram
    assert len(cjk) == len([i for i in range(40) if i % 3 == 1])
    assert find_hits(store, SearchQuery(q="reply 天气 13"))[0].row.record_id == "chatcmpl-0013"
    high = find_hits(store, SearchQuery(fve_min=0.85, source="completion", limit=200))
    assert high and all(h.row.fve >= 0.85 for h in high)
    rows = list(store.iter_texts(batch=3))  # batches end inside a record's rows: none lost, none twice
    assert rows == list(store.iter_texts()) and len(rows) == 80 and [r.seq for r in rows] == sorted(r.seq for r in rows)
    page1 = find_hits(store, SearchQuery(q="answer", limit=15))
    page2 = find_hits(store, SearchQuery(q="answer", limit=15, cursor=page1[-1].rowid))
    assert len(page1) == 15 and page2 and not {h.rowid for h in page1} & {h.rowid for h in page2}


def test_nul_characters_are_recorded_exactly_and_searchable(tmp_path, where):
    """A NUL in a prompt, an answer or an explanation (JSON allows it; PostgreSQL text does not):
    the signed entry keeps it, the search copy holds U+FFFD, and the log verifies."""
    key = LogKey.load_or_create(tmp_path / "log.key")
    log = AuditLog(open_store(where), key, checkpoint_file=tmp_path / "latest-checkpoint").open()
    rec = record(1, text="before\x00after")
    rec["prompt"]["messages"][0]["content"] = "nul\x00inside"
    rec["explanations"][0]["text"] = "quoted \x00 byte"

    async def go():
        await log.append(rec)
        await log.checkpoint_now()

    asyncio.run(go())
    log.close()
    store = open_store(where)
    assert json.loads(store.record_at(0).entry)["choices"][0]["text"] == "before\x00after"
    assert [h.row.record_id for h in find_hits(store, SearchQuery(q="quoted"))] == ["chatcmpl-0001"]
    assert find_hits(store, SearchQuery(q="nul\x00ins")) == find_hits(store, SearchQuery(q="nul\ufffdins"))
    rep = verify(key, where, tmp_path)
    assert rep.ok, rep.problems


def test_proofs_verify_offline_and_forged_proofs_do_not(tmp_path, where):
    key, db = fill(tmp_path, where=where, n=21, checkpoint_every=6)
    store = open_store(db)
    size, _, note = store.latest_checkpoint()
    doc = json.loads(json.dumps(record_document(store.record_by_id("chatcmpl-0009"), store.node, (size, note),
                                                key.verifier)))
    assert "record #9" in verify_record_proof(doc, key.verifier)

    def forged(change) -> None:
        d = json.loads(json.dumps(doc))
        change(d)
        with pytest.raises((merkle.ProofError, NoteError)):
            verify_record_proof(d, key.verifier)

    forged(lambda d: d["record"]["choices"][0].update(text="a different answer"))  # the record shown
    forged(lambda d: d.update(entry=base64.b64encode(canonical(d["record"] | {"status": "failed"})).decode()))
    forged(lambda d: d["proof"]["hashes"].reverse())
    forged(lambda d: d["proof"]["hashes"].append(d["proof"]["hashes"][0]))
    forged(lambda d: d["proof"].update(tree_size=d["proof"]["tree_size"] + 1))
    forged(lambda d: d["proof"].update(checkpoint=d["proof"]["checkpoint"].replace(f"\n{size}\n", f"\n{size - 1}\n")))
    forged(lambda d: d.update(signature=base64.b64encode(b"\0" * 64).decode()))
    forged(lambda d: d.update(seq=8) or d["proof"].update(leaf_index=8))
    other = LogKey.load_or_create(tmp_path / "other.key")
    with pytest.raises((merkle.ProofError, NoteError)):
        verify_record_proof(doc, other.verifier)  # someone else's key proves nothing
    # consistency between two stored checkpoints
    cps = store.checkpoints()
    (s1, _, n1), (s2, _, n2) = cps[0], cps[-1]
    cdoc = json.loads(json.dumps(consistency_document((s1, n1), (s2, n2), store.node)))
    assert f"of {s2} records extends the log of {s1}" in verify_consistency_proof(cdoc, key.verifier)
    cdoc["hashes"][0] = cdoc["hashes"][-1]
    with pytest.raises(merkle.ProofError):
        verify_consistency_proof(cdoc, key.verifier)


def tamper(db: str, *statements) -> None:
    """Change the database behind the log's back, as someone with write access to it could."""
    store = open_store(db)
    for sql, args in statements:
        store.execute(sql, args)
    store.conn.commit()
    store.close()


def fetch(db: str, sql: str, args=()) -> list:
    store = open_store(db)
    rows = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in store.rows(sql, args)]
    store.close()
    return rows


def entry_of(db: str, seq: int) -> dict:
    return json.loads(fetch(db, "SELECT entry FROM records WHERE seq = ?", (seq,))[0][0])


@pytest.mark.parametrize("case", ["edit", "edit_and_rehash", "delete", "swap", "forged_append", "rollback",
                                  "forged_checkpoint"])
def test_tampering_is_detected_and_names_the_record(tmp_path, where, case):
    key, db = fill(tmp_path, where=where, n=30, checkpoint_every=8)
    assert verify(key, db, tmp_path).ok
    extra = []
    if case == "edit":  # an explanation's text changed in place
        e = entry_of(db, 12)
        e["explanations"][0]["text"] = "nothing to see here"
        tamper(db, ("UPDATE records SET entry = ? WHERE seq = 12", (canonical(e),)))
        expect = "record #12 (id chatcmpl-0012) was edited"
    elif case == "edit_and_rehash":  # ... and the forger recomputed the leaf and its tree nodes
        e = entry_of(db, 12)
        e["choices"][0]["text"] = "a nicer answer"
        leaf = merkle.leaf_hash(canonical(e))
        tamper(db, ("UPDATE records SET entry = ? WHERE seq = 12", (canonical(e),)),
               ("UPDATE tree SET hash = ? WHERE level = 0 AND idx = 12", (leaf,)))
        expect = "record #12 (id chatcmpl-0012)"
    elif case == "delete":
        tamper(db, ("DELETE FROM records WHERE seq = 7", ()))
        expect = "record #7 was deleted"
    elif case == "swap":  # two rows' contents exchanged, positions kept
        [a] = fetch(db, "SELECT id, entry, sig FROM records WHERE seq = 3")
        [b] = fetch(db, "SELECT id, entry, sig FROM records WHERE seq = 4")
        tamper(db, ("UPDATE records SET id = ?, entry = ?, sig = ? WHERE seq = 3", b),
               ("UPDATE records SET id = ?, entry = ?, sig = ? WHERE seq = 4", a))
        expect = "record #3 (id chatcmpl-0004) holds the entry of record #4"
    elif case == "forged_append":  # a new last row, with its leaf, as the server would write it
        e = record(999) | {"seq": 30, "time": "2026-12-02T00:00:00Z"}
        leaf = merkle.leaf_hash(canonical(e))
        tamper(db, ("INSERT INTO records (seq, id, time, kind, status, model, key_id, entry, sig) "
                    "VALUES (30, 'chatcmpl-0999', ?, 'chat', 'completed', 'tiny', 'bob', ?, ?)",
                    (time.time(), canonical(e), b"\0" * 64)),
               ("INSERT INTO tree (level, idx, hash) VALUES (0, 30, ?)", (leaf,)))
        expect = "record #30 (id chatcmpl-0999) is not signed by this log's key"
    elif case == "rollback":  # an old copy of the database restored (an auditor kept the checkpoint)
        saved = (tmp_path / "latest-checkpoint").read_text()
        tamper(db, ("DELETE FROM records WHERE seq >= 20", ()), ("DELETE FROM tree WHERE idx >= 20 AND level = 0", ()),
               ("DELETE FROM checkpoints WHERE size > 20", ()))
        extra = [saved]
        expect = "records #20..#29 are missing (the log was rolled back"
    else:  # a checkpoint row replaced with one signed by another key
        other = LogKey.load_or_create(tmp_path / "evil.key", name=key.origin)
        size = open_store(db).latest_checkpoint()[0]
        tamper(db, ("UPDATE checkpoints SET note = ? WHERE size = ?",
                    (Checkpoint(key.origin, size, b"\1" * 32).sign(other), size)))
        expect = f"stored checkpoint of size {size} is not valid"
    rep = verify(key, db, tmp_path, extra)
    assert not rep.ok
    assert any(expect in p for p in rep.problems), rep.problems
    if case != "forged_checkpoint":
        assert expect in rep.problems[0] or any(expect in p for p in rep.problems[:2])


TEXT_COLS = ("seq, record_id, time, model, key_id, source, choice_index, token_index, token, status, fve, grounding, "
             "monitors, text")
EXPLANATION_12 = "seq = 12 AND source = 'completion'"  # record 12's explanation row (monitor "tested", fve 0.2)
SEARCH_TAMPERING = {
    # case: (statements, the one problem verify must report)
    "text": ([("UPDATE texts SET text = 'nothing to see here' WHERE seq = 12 AND source = 'output'", ())],
             "the search row of record #12 (id chatcmpl-0012), output of choice 0, says text 'nothing to see here' "
             "but the signed record says 'answer 12'"),
    "missing": ([(f"DELETE FROM texts WHERE {EXPLANATION_12}", ())],
                "the search row of record #12 (id chatcmpl-0012), completion explanation of choice 0 token 4, is "
                "missing: search cannot find 'the assistant is being tested, item 12'"),
    "extra": ([(f"INSERT INTO texts ({TEXT_COLS}) SELECT seq, record_id, time, model, key_id, source, choice_index, "
                f"9, token, status, fve, grounding, monitors, 'invented' FROM texts WHERE {EXPLANATION_12}", ())],
              "record #12 (id chatcmpl-0012) has an extra search row, completion explanation of choice 0 token 9, "
              "saying 'invented', that its signed record does not hold"),
    "fve": ([(f"UPDATE texts SET fve = 0.99 WHERE {EXPLANATION_12}", ())],
            "the search row of record #12 (id chatcmpl-0012), completion explanation of choice 0 token 4, says fve "
            "0.99 but the signed record says 0.2"),
    "monitors": ([(f"UPDATE texts SET monitors = '' WHERE {EXPLANATION_12}", ())],  # hidden from `monitor=tested`
                 "the search row of record #12 (id chatcmpl-0012), completion explanation of choice 0 token 4, says "
                 "monitors '' but the signed record says ',tested,'"),
    "filters": ([(f"UPDATE texts SET status = 'failed', key_id = 'carol' WHERE {EXPLANATION_12}", ())],
                "the search row of record #12 (id chatcmpl-0012), completion explanation of choice 0 token 4, says "
                "key_id 'carol' and status 'failed' but the signed record says key_id 'bob' and status 'ok'"),
    "moved": ([("UPDATE texts SET seq = 13, record_id = 'chatcmpl-0013' WHERE seq = 12 AND source = 'output'", ())],
              "the search row of record #12 (id chatcmpl-0012), output of choice 0, is missing: search cannot find "
              "'answer 12'"),
    "invented": ([(f"INSERT INTO texts ({TEXT_COLS}) VALUES (99, 'chatcmpl-fake', 0, 'tiny', 'bob', 'output', 0, "
                   "NULL, NULL, 'completed', NULL, NULL, '', 'an answer never given')", ())],
                 "record #99 (id chatcmpl-fake) is not in the log, but its search row output of choice 0 remains, "
                 "saying 'an answer never given'"),
}


@pytest.mark.parametrize("case", sorted(SEARCH_TAMPERING))
def test_a_tampered_search_row_fails_verify_naming_the_record(tmp_path, where, case):
    """The texts table is not signed: verify derives each record's rows again from its signed entry
    and names each row that differs from them, is missing, or belongs to no record."""
    key, db = fill(tmp_path, where=where, n=30, checkpoint_every=8)
    clean = verify(key, db, tmp_path)
    assert clean.ok and clean.search_rows == 60, clean.problems  # an output and an explanation per record
    statements, expect = SEARCH_TAMPERING[case]
    tamper(db, *statements)
    rep = verify(key, db, tmp_path)
    assert not rep.ok
    if case == "moved":  # gone from record 12's answers, and an answer record 13 does not hold
        assert rep.problems == [expect, "record #13 (id chatcmpl-0013) has an extra search row, output of choice 0, "
                                        "saying 'answer 12', that its signed record does not hold"]
    else:
        assert rep.problems == [expect]


@pytest.mark.parametrize("column, value", [("status", "completed"), ("kind", "retention"), ("model", "other"),
                                           ("key_id", "someone"), ("time", 1.0)])
def test_a_tampered_records_column_fails_verify(tmp_path, where, column, value):
    """The records row's own columns (which export, retention and listing filter on) must match
    the signed entry; a record relabelled as a retention record is reported, not trusted."""
    key, db = fill(tmp_path, where=where, n=10)
    assert verify(key, db, tmp_path).ok
    if column == "status":
        value = "failed" if entry_of(db, 5)["status"] != "failed" else "completed"
    tamper(db, (f"UPDATE records SET {column} = ? WHERE seq = 5", (value,)))
    rep = verify(key, db, tmp_path)
    assert not rep.ok
    assert any(p.startswith("record #5 (id chatcmpl-0005) was edited: its row's " + column) for p in rep.problems), \
        rep.problems


def test_search_rows_keep_exact_floats_and_a_stored_nan_is_what_the_entry_signs(tmp_path, where):
    """fve and grounding are compared exactly: the backend's float keeps every bit (SQLite REAL,
    PostgreSQL double precision); a NaN or an infinity, signed as null, is null in the row too."""
    key = LogKey.load_or_create(tmp_path / "log.key")
    log = AuditLog(open_store(where), key, checkpoint_file=tmp_path / "latest-checkpoint").open()
    recs = [record(i) for i in range(4)]
    for rec, fve in zip(recs, (0.1 + 0.2, 1 / 3, 5e-324, float("nan"))):
        rec["explanations"][0].update(fve=fve, grounding={"score": 2 / 3, "quotes": []})

    async def go():
        for rec in recs:
            await log.append(rec)
        await log.checkpoint_now()

    asyncio.run(go())
    log.close()
    rep = verify(key, where, tmp_path)
    assert rep.ok and rep.search_rows == 8, rep.problems
    tamper(where, ("UPDATE texts SET grounding = ? WHERE seq = 1 AND source = 'completion'",
                   (2 / 3 + 2**-52,)))  # one bit off
    assert verify(key, where, tmp_path).problems == [
        "the search row of record #1 (id chatcmpl-0001), completion explanation of choice 0 token 4, says grounding "
        f"{2 / 3 + 2**-52!r} but the signed record says {2 / 3!r}"]


def test_a_record_with_many_tampered_search_rows_names_five_and_counts_the_rest(tmp_path):
    key = LogKey.load_or_create(tmp_path / "log.key")
    log = AuditLog(open_store(str(tmp_path / "audit.db")), key, checkpoint_file=tmp_path / "latest-checkpoint").open()
    rec = record(3)
    rec["explanations"] = [dict(rec["explanations"][0], token_index=i, text=f"position {i}") for i in range(8)]

    async def go():
        await log.append(rec)
        await log.checkpoint_now()

    asyncio.run(go())
    log.close()
    tamper(str(tmp_path / "audit.db"), ("UPDATE texts SET fve = 0.5 WHERE source = 'completion'", ()))
    problems = verify(key, str(tmp_path / "audit.db"), tmp_path).problems
    assert problems[:5] == [f"the search row of record #0 (id chatcmpl-0003), completion explanation of choice 0 "
                            f"token {i}, says fve 0.5 but the signed record says 0.3" for i in range(5)]
    assert problems[5:] == ["record #0 (id chatcmpl-0003): 3 more problems with its search rows (not listed)"]


def test_the_cli_verify_fails_on_a_tampered_search_row(tmp_path, where):
    key, db = fill(tmp_path, where=where, n=10, checkpoint_every=4)
    cli = [str(Path(sys.executable).with_name("nla-serve")), "audit", "verify", "--audit-db", db, "--public-key",
           str(key.verifier), "--checkpoint", str(tmp_path / "latest-checkpoint"), "--cache-dir", str(tmp_path)]
    res = subprocess.run(cli, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("OK: 10 records (10 present, 0 deleted by retention), 3 "
                                                          "checkpoint(s) and 20 search row(s) checked")
    tamper(db, ("UPDATE texts SET text = 'a kinder answer' WHERE seq = 6 AND source = 'output'", ()))
    res = subprocess.run(cli, capture_output=True, text=True)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.splitlines()[0] == ("FAIL: the search row of record #6 (id chatcmpl-0006), output of choice 0, "
                                          "says text 'a kinder answer' but the signed record says 'answer 6'")
    assert res.stdout.strip().splitlines()[-1].startswith("FAILED: 10 records")
    res = subprocess.run(cli + ["--json"], capture_output=True, text=True)
    assert res.returncode == 1 and json.loads(res.stdout)["problems"][0].startswith("the search row of record #6")


def test_retention_deletes_whole_records_and_verify_still_passes(tmp_path, where):
    key, db = fill(tmp_path, where=where, n=25, checkpoint_every=5)
    store = open_store(db)
    cut = store.record_at(10).time + 1e-6  # records 0..10 are "old"
    log = AuditLog(store, key, checkpoint_file=tmp_path / "latest-checkpoint").open()
    log.prune(cut)

    async def after():
        await log.checkpoint_now()
        await log.append(record(100))

    asyncio.run(after())
    log.close()
    store = open_store(db)
    assert store.record_at(3) is None and store.record_at(11) is not None
    assert not find_hits(store, SearchQuery(request_id="chatcmpl-0003"))
    ret = store.records_of_kind("retention")
    assert len(ret) == 1 and json.loads(ret[0].entry)["pruned"] == {
        "through_seq": 10, "before": json.loads(ret[0].entry)["pruned"]["before"], "count": 11}
    rep = verify(key, db, tmp_path)
    assert rep.ok, rep.problems
    assert rep.pruned == 11 and rep.size == 27
    assert rep.search_rows == 2 * 15  # the retention record (#25) has none; #11..#24 and #26 have two each
    # a search row left behind for a pruned record is extra
    tamper(db, (f"INSERT INTO texts ({TEXT_COLS}) VALUES (3, 'chatcmpl-0003', 0, 'tiny', 'alice', 'output', 0, NULL, "
                "NULL, 'completed', NULL, NULL, '', 'answer 3')", ()))
    assert verify(key, db, tmp_path).problems == [
        "record #3 (id chatcmpl-0003) was deleted by retention, but its search row output of choice 0 remains, "
        "saying 'answer 3'"]
    tamper(db, ("DELETE FROM texts WHERE seq = 3", ()))
    # a deletion that no retention record covers is still caught
    tamper(db, ("DELETE FROM records WHERE seq = 15", ()))
    problems = verify(key, db, tmp_path).problems
    assert problems[0] == "record #15 was deleted (its leaf hash is still in the tree; no retention record covers it)"
    assert problems[1:] == [f"record #15 (id chatcmpl-0015) was deleted, but its search row {part} remains, saying "
                            f"{text}" for part, text in (("completion explanation of choice 0 token 4",
                                                          "'the assistant is being tested, item 15'"),
                                                         ("output of choice 0", "'answer 15'"))]


def test_a_damaged_unsigned_tail_stops_the_server_from_extending_the_log(tmp_path, where):
    key, db = fill(tmp_path, where=where, n=5, checkpoint_every=1000, checkpoint_seconds=1000)
    store = open_store(db)
    # drop the checkpoints so that the tail is unsigned, then forge a tail record
    tamper(db, ("DELETE FROM checkpoints", ()))
    e = entry_of(db, 4)
    e["choices"][0]["text"] = "edited while the server was down"
    tamper(db, ("UPDATE records SET entry = ? WHERE seq = 4", (canonical(e),)))
    from nla_serve.audit.log import AuditError

    with pytest.raises(AuditError, match="record #4 .* was edited"):
        AuditLog(store, key).open()


def test_two_replicas_share_one_log(tmp_path, where):
    """Two writers (replicas sharing the key, as a Kubernetes secret would) append to one database
    at once: their records interleave into one tree that verifies, none lost, none duplicated."""
    key = LogKey.load_or_create(tmp_path / "log.key")
    logs = [AuditLog(open_store(where), key, checkpoint_every=16).open() for _ in range(2)]

    async def go():
        await asyncio.gather(*[logs[i % 2].append(record(i)) for i in range(60)])
        for log in logs:
            await log.checkpoint_now()

    asyncio.run(go())
    for log in logs:
        log.close()
    store = open_store(where)
    seqs = sorted(r.seq for r in store.iter_records())
    assert seqs == list(range(60))
    assert sorted(json.loads(r.entry)["id"] for r in store.iter_records()) == sorted(record(i)["id"] for i in range(60))
    rep = verify_log(store, key.verifier, [])
    assert rep.ok and rep.size == 60, rep.problems
