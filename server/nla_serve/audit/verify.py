"""Checking a log with nothing but the public key: the whole database (``verify_log``), or one
record's proof offline (``verify_record_proof``, ``verify_consistency_proof``).

``verify_log`` reads every record and leaf in order and reports, in order, each record that was
edited (its content no longer matches its signed leaf hash), inserted or forged (no valid
signature by the log key), moved (its entry says another position), deleted (missing and not
covered by a retention record), and each checkpoint whose root the stored records no longer
produce, or that is larger than the log (the log was rolled back to an older copy). Alongside, the
search rows are checked against the records they were derived from (verify_texts.py): search
cannot be made to hide or misquote a record without ``verify`` saying so.
"""

from __future__ import annotations

import base64
import itertools
import json
from dataclasses import dataclass, field

from nla_serve.audit import merkle
from nla_serve.audit.note import NoteError, Verifier, open_checkpoint, record_statement
from nla_serve.audit.store import RecordRow, Store
from nla_serve.audit.verify_texts import TextsCheck, iso_or_none


@dataclass
class Report:
    records: int = 0
    pruned: int = 0
    checkpoints: int = 0
    size: int = 0
    search_rows: int = 0  # stored search rows compared with their signed record
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"ok": self.ok, "size": self.size, "records": self.records, "pruned": self.pruned,
                "checkpoints_checked": self.checkpoints,
                "search_rows_checked": self.search_rows, "problems": self.problems, "notes": self.notes}


def _name(row: RecordRow) -> str:
    return f"record #{row.seq} (id {row.id})"


def check_record(row: RecordRow, verifier: Verifier, stored_leaf: bytes | None) -> str | None:
    """What is wrong with one stored record, or None."""
    try:
        entry = json.loads(row.entry)
    except ValueError:
        return f"{_name(row)} was edited: its entry is not JSON"
    if not isinstance(entry, dict):
        return f"{_name(row)} was edited: its entry is not a JSON object"
    if entry.get("seq") != row.seq:
        return (f"{_name(row)} holds the entry of record #{entry.get('seq')} (id {entry.get('id')}): "
                "records were swapped or reordered")
    if entry.get("id") != row.id:
        return f"{_name(row)} was edited: its row says id {row.id} but its entry says {entry.get('id')}"
    leaf = merkle.leaf_hash(row.entry)
    if not verifier.check(record_statement(verifier.name, row.seq, leaf), row.sig):
        if stored_leaf is not None and stored_leaf != leaf:
            return f"{_name(row)} was edited: its content no longer matches the leaf hash the server signed"
        return f"{_name(row)} is not signed by this log's key: it was inserted or forged"
    if stored_leaf is not None and stored_leaf != leaf:
        return f"{_name(row)}: its tree leaf was altered"
    return check_columns(row, entry)


def check_columns(row: RecordRow, entry: dict) -> str | None:
    """The records row's own columns against its signed entry: export, retention and the records
    listing filter on them, so an edited column would hide or move a record there."""
    stored = {"kind": row.kind, "status": row.status, "model": row.model, "key_id": row.key_id}
    wrong = [f"{k} {v!r} (signed: {entry.get(k)!r})" for k, v in stored.items() if v != entry.get(k)]
    if iso_or_none(row.time) != entry.get("time"):
        wrong.append(f"time {row.time!r} (signed: {entry.get('time')!r})")
    if wrong:
        return f"{_name(row)} was edited: its row's " + ", ".join(wrong) + " differ from its signed entry"
    return None


def verify_log(store: Store, verifier: Verifier, extra_checkpoints: list[str] = ()) -> Report:
    rep = Report()
    # Which deletions were lawful: the retention records (each signed) say up to where.
    pruned_through = -1
    for row in store.records_of_kind("retention"):
        if check_record(row, verifier, None) is None:  # signed, and its kind column is the entry's
            pruned_through = max(pruned_through, int(json.loads(row.entry)["pruned"]["through_seq"]))
    # Checkpoints: each must be ours; then the tree at its size must have its root.
    wanted: dict[int, list[tuple[str, bytes]]] = {}
    for size, _, note in store.checkpoints():
        _take_checkpoint(note, verifier, f"stored checkpoint of size {size}", wanted, rep, stated=size)
    for i, note in enumerate(extra_checkpoints):
        _take_checkpoint(note, verifier, f"checkpoint {i + 1} given to verify", wanted, rep)

    tree = merkle.Frontier()
    texts = TextsCheck(store, rep.problems)
    records = store.iter_records()
    leaves = store.iter_leaves()
    row = next(records, None)
    leaf_row = next(leaves, None)
    seq = 0
    while row is not None or leaf_row is not None:
        stored_leaf = leaf_row[1] if leaf_row is not None and leaf_row[0] == seq else None
        if leaf_row is not None and leaf_row[0] < seq:
            leaf_row = next(leaves, None)
            continue
        if row is not None and row.seq == seq:
            problem = check_record(row, verifier, stored_leaf)
            if problem:
                rep.problems.append(problem)
            texts.record(row, trusted=problem is None)
            leaf = merkle.leaf_hash(row.entry)
            rep.records += 1
            row = next(records, None)
        elif stored_leaf is not None:
            leaf = stored_leaf
            if seq <= pruned_through:
                rep.pruned += 1
            else:
                rep.problems.append(f"record #{seq} was deleted (its leaf hash is still in the tree; no retention "
                                    "record covers it)")
            texts.gone(seq, pruned=seq <= pruned_through)
        else:
            nxt = min(x for x in (row.seq if row else None, leaf_row[0] if leaf_row else None) if x is not None)
            rep.problems.append(f"records #{seq}..#{nxt - 1} were deleted together with their tree leaves")
            # the tree can no longer be recomputed past the hole: every later checkpoint is unverifiable
            rep.size = seq
            for later in itertools.chain([row] if row else [], records):  # their search rows can still be checked
                texts.record(later, trusted=check_record(later, verifier, None) is None)
            break
        if stored_leaf is not None:
            leaf_row = next(leaves, None)
        tree.append(leaf)
        seq += 1
        for origin, root in wanted.get(seq, []):
            rep.checkpoints += 1
            if tree.root() != root:
                rep.problems.append(f"the {origin} does not match the records: one of records #0..#{seq - 1} was "
                                    "changed, deleted or inserted after it was signed")
    else:
        rep.size = seq
    for size in sorted(s for s in wanted if s > rep.size):
        for origin, _ in wanted[size]:
            rep.problems.append(f"the {origin} covers {size} records but the log holds {rep.size}: records "
                                f"#{rep.size}..#{size - 1} are missing (the log was rolled back or truncated)")
    texts.finish(rep.size)
    rep.search_rows = texts.checked
    unsigned = rep.size - max((s for s in wanted if s <= rep.size), default=0)
    if unsigned and rep.ok:
        rep.notes.append(f"{unsigned} record(s) after the last checkpoint are covered by their own signatures only")
    return rep


def _take_checkpoint(note: str, verifier: Verifier, origin: str, wanted: dict, rep: Report,
                     stated: int | None = None) -> None:
    try:
        cp = open_checkpoint(note, verifier)
    except NoteError as e:
        rep.problems.append(f"the {origin} is not valid: {e}")
        return
    if stated is not None and cp.size != stated:
        rep.problems.append(f"the {origin} says size {cp.size}: the checkpoints table was edited")
        return
    for other_origin, root in wanted.get(cp.size, []):
        if root != cp.root:
            rep.problems.append(f"the {origin} and the {other_origin} sign different roots for size {cp.size}: "
                                "the log forked")
    wanted.setdefault(cp.size, []).append((origin, cp.root))


# -- offline proofs -------------------------------------------------------------------------------

def b64(h: bytes) -> str:
    return base64.b64encode(h).decode()


def unb64(s) -> bytes:
    if not isinstance(s, str):
        raise merkle.ProofError("a hash in the proof is not a base64 string")
    try:
        return base64.b64decode(s, validate=True)
    except ValueError:
        raise merkle.ProofError("a hash in the proof is not valid base64") from None


def verify_record_proof(doc: dict, verifier: Verifier) -> str:
    """Check what ``GET /v1/audit/records/{id}`` returned, with the public key alone: the entry is
    the canonical form of the record, signed by the log, included in a checkpoint signed by the
    log. Returns a one-line summary; raises ProofError or NoteError naming what fails."""
    from nla_serve.audit.record import canonical

    try:
        record, proof = doc["record"], doc["proof"]
        entry = base64.b64decode(doc["entry"], validate=True)
        seq = int(doc["seq"])
        sig = unb64(doc["signature"])
        hashes = [unb64(h) for h in proof["hashes"]]
        note = proof["checkpoint"]
        leaf_index = int(proof["leaf_index"])
        tree_size = int(proof["tree_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise merkle.ProofError(f"the proof document is missing or mangles a field ({type(e).__name__}: {e})") from None
    if canonical(record) != entry:
        raise merkle.ProofError("the record shown is not the entry that was logged (its canonical form differs)")
    if record.get("seq") != seq or leaf_index != seq:
        raise merkle.ProofError(f"the record says position {record.get('seq')}, the proof {leaf_index}, the row {seq}")
    leaf = merkle.leaf_hash(entry)
    if not verifier.check(record_statement(verifier.name, seq, leaf), sig):
        raise merkle.ProofError("the record's signature does not verify with this key")
    cp = open_checkpoint(note, verifier)
    if cp.size != tree_size:
        raise merkle.ProofError(f"the proof is for a tree of {tree_size} records but the checkpoint is of {cp.size}")
    merkle.verify_inclusion(seq, cp.size, leaf, hashes, cp.root)
    return f"record #{seq} (id {record.get('id')}) is in log {cp.origin} of {cp.size} records, signed by its key"


def verify_consistency_proof(doc: dict, verifier: Verifier) -> str:
    """Check what ``GET /v1/audit/consistency`` returned: the newer checkpoint extends the older."""
    try:
        old = open_checkpoint(doc["from"], verifier)
        new = open_checkpoint(doc["to"], verifier)
        hashes = [unb64(h) for h in doc["hashes"]]
    except (KeyError, TypeError) as e:
        raise merkle.ProofError(f"the proof document is missing a field ({e})") from None
    merkle.verify_consistency(old.size, new.size, old.root, new.root, hashes)
    return f"the log of {new.size} records extends the log of {old.size} records ({new.origin})"
