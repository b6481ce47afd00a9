"""``nla-serve audit``: verify, verify-proof, search, show, export, key. Each reads the database
directly (the server need not run); ``verify-proof`` needs nothing but a proof file and the key.

Exit status: 0 when everything checked out, 1 when verification found a problem, 2 on usage errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("audit", help="check, search and export the audit log",
                       description="Check, search and export the audit log (see docs/audit.md).")
    cmds = p.add_subparsers(dest="audit_command", required=True)

    def where(q):
        q.add_argument("--audit-db", default=None, help="SQLite file or postgresql://... (default: the server's)")
        q.add_argument("--cache-dir", default=None, help="the server's cache root (for the default locations)")
        q.add_argument("--audit-key", default=None, help="the log's private key file (default: the server's)")
        return q

    v = where(cmds.add_parser("verify", help="recompute the tree and check every record, checkpoint and search row"))
    v.add_argument("--public-key", default=None,
                   help="the verifier key (name+id+key, or a file holding it); default: from the key file")
    v.add_argument("--checkpoint", action="append", default=[],
                   help="a signed checkpoint saved earlier (GET /v1/audit/checkpoint): catches a rolled-back log")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    vp = cmds.add_parser("verify-proof", help="check a record's or a consistency proof offline")
    vp.add_argument("file", help="JSON from GET /v1/audit/records/{id}, /v1/audit/consistency or `audit show`")
    vp.add_argument("--public-key", required=True, help="the verifier key (or a file holding it)")
    vp.set_defaults(func=cmd_verify_proof)

    s = where(cmds.add_parser("search", help="full-text search over explanations and outputs"))
    s.add_argument("q", nargs="?", default=None)
    for flag in ("since", "until", "model", "key-id", "status", "monitor", "source", "request-id"):
        s.add_argument("--" + flag, default=None)
    s.add_argument("--verdict", default=None, help="explanations with a claim of this verdict: supported | "
                   "unsupported | contradicted | unknown (the words must occur in that claim)")
    for flag in ("fve-min", "fve-max", "grounding-min", "grounding-max"):
        s.add_argument("--" + flag, type=float, default=None)
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--cursor", type=int, default=None, help="the next page: the cursor the previous page printed")
    s.add_argument("--json", action="store_true", help="one hit per line, as GET /v1/audit/search returns them")
    s.set_defaults(func=cmd_search)

    sh = where(cmds.add_parser("show", help="one record with its inclusion proof, as JSON"))
    sh.add_argument("id")
    sh.set_defaults(func=cmd_show)

    ex = where(cmds.add_parser("export", help="records as JSON lines, each with its proof"))
    ex.add_argument("--since", default=None)
    ex.add_argument("--until", default=None)
    ex.set_defaults(func=cmd_export)

    k = where(cmds.add_parser("key", help="print the log's verifier key"))
    k.set_defaults(func=cmd_key)


def _settings(args):
    from nla_serve.config import ServerSettings

    return ServerSettings.flat(cache_dir=args.cache_dir, audit_db=args.audit_db, audit_key=args.audit_key)


def _store(args):
    from nla_serve.audit.store import is_dsn, open_store

    s = _settings(args)
    loc = s.audit_location
    if not is_dsn(loc) and not Path(loc).expanduser().exists():
        raise SystemExit(f"nla-serve audit: no audit database at {loc} (give --audit-db)")
    return open_store(loc)


def _verifier_text(value: str) -> str:
    p = Path(value).expanduser()
    return p.read_text(encoding="utf-8").strip() if p.is_file() else value


def _trusted_verifier(args, store):
    """The key to trust: given, else derived from the private key file; the database's own copy
    only as a last resort (a forger who rewrote the database could have replaced it), with a warning."""
    from nla_serve.audit.note import LogKey, NoteError, Verifier

    try:
        if getattr(args, "public_key", None):
            return Verifier.parse(_verifier_text(args.public_key))
        path = _settings(args).audit_key_path
        if path.exists():
            return LogKey.load_or_create(path).verifier
    except NoteError as e:
        raise SystemExit(f"nla-serve audit: {e}") from None
    stored = store.meta("verifier_key")
    if stored is None:
        raise SystemExit("nla-serve audit: no key to verify with: give --public-key")
    print("nla-serve audit: warning: trusting the verifier key stored in the database itself; "
          "pass --public-key for a check a forger cannot pass", file=sys.stderr)
    return Verifier.parse(stored)


def cmd_verify(args) -> int:
    from nla_serve.audit.verify import verify_log

    store = _store(args)
    verifier = _trusted_verifier(args, store)
    notes = [Path(c).read_text(encoding="utf-8") for c in args.checkpoint]
    beside = _settings(args).audit_checkpoint_file
    if not args.checkpoint and beside.is_file():
        notes.append(beside.read_text(encoding="utf-8"))  # the server's copy outside the database
    report = verify_log(store, verifier, notes)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for p in report.problems:
            print("FAIL:", p)
        for n in report.notes:
            print("note:", n)
        print(("OK: " if report.ok else "FAILED: ") + f"{report.size} records ({report.records} present, "
              f"{report.pruned} deleted by retention), {report.checkpoints} checkpoint(s) and "
              f"{report.search_rows} search row(s) checked, log "
              f"{verifier.name}")
    return 0 if report.ok else 1


def cmd_verify_proof(args) -> int:
    from nla_serve.audit.merkle import ProofError
    from nla_serve.audit.note import NoteError, Verifier
    from nla_serve.audit.verify import verify_consistency_proof, verify_record_proof

    try:
        verifier = Verifier.parse(_verifier_text(args.public_key))
        doc = json.loads(Path(args.file).read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ProofError("the proof file is not a JSON object")
        if "proof" in doc and doc["proof"] is None:
            raise ProofError(doc.get("proof_reason") or "the document has no proof")
        summary = verify_consistency_proof(doc, verifier) if "from" in doc else verify_record_proof(doc, verifier)
    except (ProofError, NoteError) as e:
        print(f"FAILED: {e}")
        return 1
    except (OSError, ValueError) as e:
        print(f"nla-serve audit: {args.file}: {e}", file=sys.stderr)
        return 2
    print("OK:", summary)
    return 0


def cmd_search(args) -> int:
    """The same search as GET /v1/audit/search (store/search.py): the same hits, order and snippets."""
    from nla_serve.audit.store import QueryError, parse_query, search_log

    fields = {k: getattr(args, k) for k in ("q", "since", "until", "model", "key_id", "status", "monitor", "source",
                                            "request_id", "verdict", "fve_min", "fve_max", "grounding_min",
                                            "grounding_max", "limit", "cursor") if getattr(args, k) is not None}
    try:
        query = parse_query(fields)
    except QueryError as e:
        raise SystemExit(f"nla-serve audit search: {e}") from None
    page = search_log(_store(args), query)
    for hit in page["data"]:
        if args.json:
            print(json.dumps(hit, ensure_ascii=False))
        else:
            fve = "" if hit["fve"] is None else f" fve {hit['fve']:.2f}"
            where = hit["source"] if hit["token_index"] is None else f"{hit['source']} token {hit['token_index']}"
            print(f"{hit['time']}  {hit['request_id']}  {where}{fve}\n    {hit['snippet']}")
            for c in hit.get("claims") or []:  # the claims a --verdict filter matched
                support = "" if c["support"] is None else f", support {c['support']:+.3f}"
                print(f"    claim [{c['verdict'] or 'no verdict'}{support}]: {c['text']}")
    more = "" if page["next_cursor"] is None else f"; the next page: --cursor {page['next_cursor']}"
    if not args.json:
        print(f"{len(page['data'])} hit(s){more}")
    elif more:
        print(f"nla-serve audit search: {len(page['data'])} hit(s){more}", file=sys.stderr)
    return 0


def cmd_show(args) -> int:
    from nla_serve.audit.proofs import record_document

    store = _store(args)
    row = store.record_by_id(args.id)
    if row is None:
        print(f"nla-serve audit: no record {args.id!r}", file=sys.stderr)
        return 1
    latest = store.latest_checkpoint()
    doc = record_document(row, store.node, (latest[0], latest[2]) if latest else None,
                          _trusted_verifier(args, store))
    print(json.dumps(doc, indent=2, ensure_ascii=False))
    return 0


def cmd_export(args) -> int:
    from nla_serve.audit.proofs import record_document
    from nla_serve.audit.store import parse_time

    store = _store(args)
    verifier = _trusted_verifier(args, store)
    latest = store.latest_checkpoint()
    cp = (latest[0], latest[2]) if latest else None
    try:
        since, until = parse_time(args.since), parse_time(args.until)
    except ValueError as e:
        raise SystemExit(f"nla-serve audit export: {e}") from None
    after, n = None, 0
    while True:
        rows = store.list_records(since, until, after, 1000)
        if not rows:
            break
        for row in rows:
            sys.stdout.write(json.dumps(record_document(row, store.node, cp, verifier), ensure_ascii=False) + "\n")
            n += 1
        after = rows[-1].seq
    print(f"exported {n} record(s)", file=sys.stderr)
    return 0


def cmd_key(args) -> int:
    store = _store(args)
    print(_trusted_verifier(args, store))
    return 0
