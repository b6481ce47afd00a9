"""The audit log through the real server: every answer recorded before it is acknowledged, key
ids instead of keys, proofs that verify offline with the CLI, search over what was said, closed
audit routes, redaction, and a server killed with ``kill -9`` under load that loses no
acknowledged record. Real HTTP, the real ``openai`` SDK, the real CLI, real SQLite."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import MODEL, AppServer, start_cli, until
from nla_serve.api.app import create_app
from nla_serve.audit.note import Verifier, open_checkpoint
from nla_serve.audit.store import open_store
from nla_serve.config import ServerSettings
from nla_serve.service import Service, open_audit

KEYS = {"alice": "key-of-alice-0123456789", "bob": "key-of-bob-9876543210"}
ADMIN = "the-admin-key-abcdefghij"
CLI = [str(Path(sys.executable).with_name("nla-serve")), "audit"]


def tiny_settings(tiny, root: Path, **kw) -> ServerSettings:
    return ServerSettings.flat(model=str(tiny.target), served_model_name=MODEL, nla_av=str(tiny.av), nla_ar=str(tiny.ar),
                          engine="transformers", device="cpu", fve_baseline=1.5, max_model_len=512,
                          cache_dir=str(root / "cache"), api_keys=KEYS, admin_key=ADMIN, **kw)


@pytest.fixture(scope="module")
def audited(tiny, loop, tmp_path_factory):
    root = tmp_path_factory.mktemp("audited")
    svc = loop.run(Service.start(tiny_settings(tiny, root, audit_checkpoint_seconds=0.5)))
    server = AppServer(loop, create_app(svc.settings, svc)).start()
    yield svc, server.url
    server.stop()
    loop.run(svc.stop())


def client(url: str, who: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEYS[who], max_retries=0, timeout=120)


def admin_get(url: str, path: str, **params) -> httpx.Response:
    return httpx.get(url + path, params=params, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


def test_answers_are_recorded_before_they_are_acknowledged(audited):
    svc, url = audited
    c = client(url, "alice")
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                  max_tokens=8, temperature=0, extra_body={"explain": {"positions": "all",
                                                                                       "max_explanations": 3}})
    # no waiting: the body was sent only after the record was durable
    doc = admin_get(url, f"/v1/audit/records/{r.id}").json()
    rec = doc["record"]
    assert rec["status"] == "completed" and rec["key_id"] == "alice" and rec["kind"] == "chat"
    assert KEYS["alice"] not in json.dumps(doc)  # the key id, never the key
    assert rec["prompt"] == {"messages": [{"role": "user", "content": "Name a colour."}]}
    assert rec["choices"][0]["text"] == r.choices[0].message.content
    assert rec["choices"][0]["finish_reason"] == r.choices[0].finish_reason
    assert len(rec["choices"][0]["token_ids"]) == r.usage.completion_tokens
    assert rec["usage"]["prompt_tokens"] == r.usage.prompt_tokens == rec["prompt_tokens"]
    wire = r.model_extra["explanations"]
    assert [(e["token_index"], e["text"], e["fve"]) for e in rec["explanations"]] == \
        [(e["token_index"], e["text"], e["fve"]) for e in wire]
    assert all(len(e["activation_sha256"]) == 64 and e["activation_dtype"] == "float32" for e in rec["explanations"])
    assert len({e["activation_sha256"] for e in rec["explanations"]}) == len(wire)  # distinct rows, distinct digests
    prod = rec["producer"]
    assert prod["layer"] == svc.layer and prod["engine"] == "transformers" and prod["dtype"] == "float32"
    assert len(prod["av_meta_sha256"]) == 64 and prod["policy"]["positions"] == "all"
    assert rec["params"]["max_tokens"] == 8 and "messages" not in rec["params"]

    # a stream: its record exists by the time [DONE] arrives; bob's key id this time
    chunks = list(client(url, "bob").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to three."}], max_tokens=6, temperature=0,
        stream=True))
    got = admin_get(url, f"/v1/audit/records/{chunks[0].id}").json()["record"]
    assert got["key_id"] == "bob" and got["status"] == "completed"
    assert got["choices"][0]["text"] == "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    # /v1/explanations of raw vectors: recorded with the vectors' digests
    d = svc.nla.d_model
    e = httpx.post(url + "/v1/explanations", headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=120,
                   json={"model": MODEL, "vectors": [[0.5] * d, [-0.25] * d], "max_tokens": 8})
    assert e.status_code == 200
    recs = admin_get(url, "/v1/audit/search", source="vector", key_id="alice").json()["data"]
    assert recs, "vector explanations are searchable"
    rec = admin_get(url, f"/v1/audit/records/{recs[0]['request_id']}").json()["record"]
    assert rec["kind"] == "explanations" and len(rec["prompt"]["vectors"]) == 2
    assert [x["activation_sha256"] for x in rec["explanations"]] == [v["sha256"] for v in rec["prompt"]["vectors"]]


def test_aborted_requests_are_recorded_as_aborted(audited):
    svc, url = audited
    with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS['bob']}"},
                      timeout=60, json={"model": MODEL, "messages": [{"role": "user", "content": "go on"}],
                                        "max_tokens": 300, "stream": True, "temperature": 0,
                                        "explain": {"positions": "all", "max_explanations": 64}}) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data:"))
    rid = json.loads(first[5:])["id"]

    def recorded():
        res = admin_get(url, f"/v1/audit/records/{rid}")
        return res.status_code == 200 and res.json()["record"]

    rec = until(recorded, 60, every=0.5)
    assert rec and rec["status"] == "aborted" and "disconnected" in rec["error"]
    assert len(rec["choices"][0]["token_ids"]) < 300


def test_proofs_checkpoints_and_search_over_http_verify_offline(audited, tmp_path):
    svc, url = audited
    c = client(url, "alice")
    ids = [c.completions.create(model=MODEL, prompt=f"Line {i}:", max_tokens=4, temperature=0,
                                extra_body={"explain": {"positions": "last"}}).id for i in range(3)]
    cp = admin_get(url, "/v1/audit/checkpoint").json()
    verifier = Verifier.parse(cp["verifier_key"])
    assert open_checkpoint(cp["checkpoint"], verifier).size == cp["size"] >= 3
    assert cp["verifier_key"] == str(svc.audit.key.verifier)

    doc = admin_get(url, f"/v1/audit/records/{ids[1]}").json()
    proof_file = tmp_path / "proof.json"
    proof_file.write_text(json.dumps(doc))
    key_file = tmp_path / "verifier.pub"
    key_file.write_text(cp["verifier_key"])
    ok = subprocess.run(CLI + ["verify-proof", str(proof_file), "--public-key", str(key_file)], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and f"id {ids[1]}" in ok.stdout, ok.stdout + ok.stderr
    doc["record"]["choices"][0]["text"] = "something else"
    proof_file.write_text(json.dumps(doc))
    bad = subprocess.run(CLI + ["verify-proof", str(proof_file), "--public-key", str(key_file)], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "FAILED" in bad.stdout

    # consistency between two checkpoints the server signed
    c.completions.create(model=MODEL, prompt="One more.", max_tokens=3, temperature=0)
    later = admin_get(url, "/v1/audit/checkpoint").json()
    assert later["size"] > cp["size"]
    cons = admin_get(url, "/v1/audit/consistency", **{"from": cp["size"], "to": later["size"]})
    assert cons.status_code == 200
    proof_file.write_text(cons.text)
    ok = subprocess.run(CLI + ["verify-proof", str(proof_file), "--public-key", cp["verifier_key"]],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "extends" in ok.stdout, ok.stdout + ok.stderr
    assert admin_get(url, "/v1/audit/consistency", **{"from": 1, "to": 10**9}).status_code == 404

    # search: the explanation text of a record just made finds that record
    rec = admin_get(url, f"/v1/audit/records/{ids[2]}").json()["record"]
    text = next(e["text"] for e in rec["explanations"] if e["text"])
    word = max(text.split(), key=len)
    hits = admin_get(url, "/v1/audit/search", q=word, key_id="alice", limit=200).json()
    assert any(h["request_id"] == ids[2] for h in hits["data"]), hits
    hit = next(h for h in hits["data"] if h["request_id"] == ids[2])
    s, e = hit["match"]
    assert hit["snippet"][s:e].casefold() == word.casefold() and hit["fve"] is not None
    outputs = admin_get(url, "/v1/audit/search", source="output", request_id=ids[0]).json()["data"]
    assert len(outputs) == 1 and outputs[0]["snippet"] == admin_get(
        url, f"/v1/audit/records/{ids[0]}").json()["record"]["choices"][0]["text"][:160]
    listed = admin_get(url, "/v1/audit/records", limit=500).json()["data"]
    assert {r["id"] for r in listed} >= set(ids)
    # bad filters are named
    bad = admin_get(url, "/v1/audit/search", fve_min="high")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "fve_min"
    bad = admin_get(url, "/v1/audit/search", since="last tuesday")
    assert bad.status_code == 400 and "ISO 8601" in bad.json()["error"]["message"]


def test_audit_routes_take_only_the_admin_key(audited, loop):
    svc, url = audited
    for headers in ({}, {"Authorization": f"Bearer {KEYS['alice']}"}, {"Authorization": "Bearer nope"}):
        r = httpx.get(url + "/v1/audit/checkpoint", headers=headers, timeout=30)
        assert r.status_code == 401, r.text
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).status_code == 401
    # without an admin key configured the routes are closed, not open, whatever key is sent
    closed = svc.settings.replace(admin_key=None)
    server = AppServer(loop, create_app(closed, svc)).start()
    try:
        for headers in ({}, {"Authorization": f"Bearer {KEYS['alice']}"}, {"Authorization": f"Bearer {ADMIN}"}):
            r = httpx.get(server.url + "/v1/audit/search", params={"q": "x"}, headers=headers, timeout=30)
            assert r.status_code == 403 and "--admin-key" in r.json()["error"]["message"], r.text
    finally:
        server.stop()


def test_redacted_prompts_keep_only_their_hash(audited, loop, tmp_path):
    svc, _ = audited
    settings = svc.settings.replace(audit_redact="prompts", cache_dir=str(tmp_path / "cache"))
    other = Service(settings, svc.target, svc.model_name, svc.model_dir, svc.nla, None, svc.worker, svc.metrics)
    other.audit = open_audit(settings)  # a second log, sharing the module's engines
    server = AppServer(loop, create_app(settings, other)).start()
    try:
        r = client(server.url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "my secret diagnosis"}], max_tokens=4, temperature=0,
            extra_body={"explain": {"positions": "prompt", "max_explanations": 2}})
        rec = admin_get(server.url, f"/v1/audit/records/{r.id}").json()["record"]
    finally:
        server.stop()
        other.audit.close()
    assert "secret" not in json.dumps(rec)
    assert rec["prompt"]["redacted"] is True and len(rec["prompt"]["sha256"]) == 64
    assert rec["explanations"] and all(e["token"] is None for e in rec["explanations"])


def test_kill_9_under_load_loses_no_acknowledged_record(tiny, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("".join(f"{k}: {v}\n" for k, v in KEYS.items()))
    admin = tmp_path / "admin.key"
    admin.write_text(ADMIN + "\n")
    flags = ["--engine", "transformers", "--api-keys-file", str(keys), "--admin-key-file", str(admin),
             "--audit-checkpoint-seconds", "1"]
    proc, url, log = start_cli(tiny, tmp_path, *flags)
    acknowledged: list[str] = []
    stop = threading.Event()

    def load(n: int) -> None:
        c = client(url, "alice" if n % 2 else "bob")
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if i % 2:
                    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"w{n} r{i}"}],
                                                  max_tokens=5, temperature=0,
                                                  extra_body={"explain": {"positions": "last"}})
                    acknowledged.append(r.id)
                else:
                    chunks = list(c.completions.create(model=MODEL, prompt=f"w{n} r{i}", max_tokens=5,
                                                       temperature=0, stream=True))
                    acknowledged.append(chunks[0].id)  # the SDK saw [DONE]: the stream completed
            except Exception:
                return  # the server is gone

    workers = [threading.Thread(target=load, args=(n,)) for n in range(6)]
    for w in workers:
        w.start()
    assert until(lambda: len(acknowledged) >= 25, 240, every=0.2), log.read_text()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    stop.set()
    for w in workers:
        w.join(60)
    done = list(acknowledged)

    db = tmp_path / "cache" / "audit" / "audit.db"
    store = open_store(str(db))
    missing = [rid for rid in done if store.record_by_id(rid) is None]
    assert not missing, f"{len(missing)} acknowledged answers are not in the log: {missing[:3]}"
    store.close()

    # restart on the same log: it signs the crash's tail, then verify passes from the CLI
    proc2, url2, log2 = start_cli(tiny, tmp_path, *flags)
    try:
        r = client(url2).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "after"}],
                                                 max_tokens=3, temperature=0)
        assert admin_get(url2, f"/v1/audit/records/{r.id}").status_code == 200
    finally:
        proc2.send_signal(signal.SIGTERM)
        proc2.wait(60)
    res = subprocess.run(CLI + ["verify", "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1].startswith("OK:"), res.stdout + res.stderr
    n_records = int(res.stdout.split("OK: ")[1].split()[0])
    assert n_records >= len(done) + 1
    # and a tampered copy of it fails from the CLI, naming the record
    import sqlite3

    con = sqlite3.connect(db)
    seq, entry = con.execute("SELECT seq, entry FROM records WHERE id = ?", (done[3],)).fetchone()
    con.execute("UPDATE records SET entry = ? WHERE seq = ?", (entry.replace(b'"status":"completed"',
                                                                             b'"status":"failed"'), seq))
    con.commit()
    con.close()
    res = subprocess.run(CLI + ["verify", "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True)
    assert res.returncode == 1 and f"record #{seq} (id {done[3]}) was edited" in res.stdout, res.stdout


def test_a_server_records_into_postgresql_and_the_cli_verifies_it(tiny, loop, tmp_path, postgres):
    """--audit-db postgresql://...: the server's records land in a real PostgreSQL server, the
    search there finds them, and `nla-serve audit verify --audit-db DSN` checks the whole log."""
    dsn = postgres.new_database()
    svc = loop.run(Service.start(tiny_settings(tiny, tmp_path, audit_db=dsn, audit_checkpoint_seconds=0.5)))
    server = AppServer(loop, create_app(svc.settings, svc)).start()
    try:
        c = client(server.url)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a river."}],
                                      max_tokens=6, temperature=0,
                                      extra_body={"explain": {"positions": "last"}})
        doc = admin_get(server.url, f"/v1/audit/records/{r.id}").json()
        assert doc["record"]["choices"][0]["text"] == r.choices[0].message.content
        hits = admin_get(server.url, "/v1/audit/search", source="output", request_id=r.id).json()["data"]
        assert [h["request_id"] for h in hits] == [r.id]
        assert cli_search(["--audit-db", dsn], {"source": "output", "request_id": r.id})[0] == hits
    finally:
        server.stop()
        loop.run(svc.stop())
    key = str(tmp_path / "cache" / "audit" / "ed25519.key")
    res = subprocess.run(CLI + ["verify", "--audit-db", dsn, "--audit-key", key], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1].startswith("OK: 1 records"), \
        res.stdout + res.stderr
    shown = subprocess.run(CLI + ["show", r.id, "--audit-db", dsn, "--audit-key", key], capture_output=True,
                           text=True)
    assert shown.returncode == 0 and json.loads(shown.stdout)["record"]["id"] == r.id


def test_cli_search_and_export_read_the_log_directly(audited):
    """`nla-serve audit search` and `export` on the server's database while it runs: the search
    finds an answer just given; every exported line carries a proof that verifies offline."""
    svc, url = audited
    r = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say pineapple."}],
                                            max_tokens=5, temperature=0)
    admin_get(url, "/v1/audit/checkpoint")  # sign a checkpoint covering it
    where = ["--cache-dir", svc.settings.cache_dir]
    found = subprocess.run(CLI + ["search", "--request-id", r.id, "--source", "output", "--json", *where],
                           capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    [hit] = [json.loads(l) for l in found.stdout.splitlines()]
    assert hit["request_id"] == r.id and hit["snippet"] == r.choices[0].message.content[:160]
    bad = subprocess.run(CLI + ["search", "--fve-min", "0.9", "--fve-max", "0.1", *where], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "fve_min" in bad.stderr
    out = subprocess.run(CLI + ["export", *where], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    docs = [json.loads(l) for l in out.stdout.splitlines()]
    assert r.id in {d["id"] for d in docs} and f"exported {len(docs)} record(s)" in out.stderr
    from nla_serve.audit.verify import verify_record_proof

    verifier = Verifier.parse(docs[0]["verifier_key"])
    assert all("is in log" in verify_record_proof(d, verifier) for d in docs if d["proof"] is not None)
    assert sum(d["proof"] is not None for d in docs) >= len(docs) - 1


def cli_search(where: list[str], params: dict) -> tuple[list[dict], str]:
    """`nla-serve audit search --json` with the HTTP route's parameters as flags: its hits and stderr."""
    p = dict(params)
    flags = [str(p.pop("q"))] if "q" in p else []
    for name, value in p.items():
        flags += ["--" + name.replace("_", "-"), str(value)]
    out = subprocess.run(CLI + ["search", "--json", *where, *flags], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()], out.stderr


def test_cli_and_http_search_give_the_same_hits(audited):
    """`nla-serve audit search` and GET /v1/audit/search answer through one function
    (store/search.py): for the same query, the same hits in the same order with the same snippets,
    match positions and fields, and the same next page."""
    svc, url = audited
    c = client(url, "bob")
    for i in range(3):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Describe a cat, {i}."}],
                                  max_tokens=6, temperature=0,
                                  extra_body={"explain": {"positions": "all", "max_explanations": 3}})
    explained = admin_get(url, "/v1/audit/search", key_id="bob", source="completion", limit=1).json()["data"]
    assert explained, "the explanations were recorded"
    word = max(re.findall(r"\w{3,}", explained[0]["snippet"]) or ["the"], key=len)
    where = ["--cache-dir", svc.settings.cache_dir]
    for params in ({"key_id": "bob", "limit": 4}, {"q": word, "limit": 2}, {"q": "a", "source": "output", "limit": 3},
                   {"fve_min": -10, "key_id": "bob", "since": "2000-01-01", "limit": 5}):
        pages, cursor = [], None
        while len(pages) < 3:
            query = params if cursor is None else dict(params, cursor=cursor)
            http = admin_get(url, "/v1/audit/search", **query).json()
            hits, err = cli_search(where, query)
            assert hits == http["data"], (query, hits, http)
            assert (f"--cursor {http['next_cursor']}" in err) == (http["next_cursor"] is not None), err
            pages.append(hits)
            cursor = http["next_cursor"]
            if cursor is None:
                break
        if "q" not in params:  # bob has 9 explanations and 3 outputs at least: full pages
            assert len(pages[0]) == params["limit"], (params, pages)
    assert len(pages) >= 2  # the last query pages: the CLI's --cursor is the route's cursor


def test_search_by_claim_verdict_over_http_and_the_cli(audited):
    """Explanations asked with claims are found by their claims' verdicts (null: ``unknown``), the
    words inside one claim, and each hit lists the claims that made it one; the CLI says the same."""
    svc, url = audited
    r = client(url, "alice").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a dog."}], max_tokens=6, temperature=0,
        extra_body={"explain": {"positions": "generated", "max_explanations": 3, "max_tokens": 16, "claims": True}})
    items = [i for i in r.model_extra["explanations"] if i.get("claims")]
    assert items, r.model_extra["explanations"]
    where = ["--cache-dir", svc.settings.cache_dir]
    for verdict in {c["verdict"] or "unknown" for i in items for c in i["claims"]}:
        def ours(c):
            return (c["verdict"] or "unknown") == verdict

        body = admin_get(url, "/v1/audit/search", verdict=verdict, request_id=r.id).json()
        assert sorted(h["token_index"] for h in body["data"]) == sorted(
            i["token_index"] for i in items if any(ours(c) for c in i["claims"]))
        for h in body["data"]:
            item = next(i for i in items if i["token_index"] == h["token_index"])
            assert h["claims"] == [c for c in item["claims"] if ours(c)]
        assert cli_search(where, {"verdict": verdict, "request_id": r.id})[0] == body["data"]
        # words are searched inside the claims of that verdict: each hit lists a claim holding them
        word = re.search(r'[^\s"]{1,4}', body["data"][0]["claims"][0]["text"]).group(0)  # tiny NLAs write junk
        found = admin_get(url, "/v1/audit/search", q=word, verdict=verdict, request_id=r.id).json()["data"]
        assert body["data"][0]["token_index"] in [h["token_index"] for h in found]
        assert all(any(word.lower() in c["text"].lower() for c in h["claims"]) for h in found)
    bad = admin_get(url, "/v1/audit/search", verdict="yes")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "verdict"
