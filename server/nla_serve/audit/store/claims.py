"""Claims as search rows: each claim of an explanation (``{text, support, verdict}``, which the
signed entry keeps when the request asked for claims) is a row of the ``claims`` table, tied to its
explanation's row of ``texts`` (``text_row``, that row's key), so that search can filter on a
claim's verdict and find words inside one claim (search.py).

Like the texts rows (``record.texts_of``), they are derived from the signed entry, by
``explanation_claims``: the writer (``Store.write``), migration 2 (``backfill``, for records
written before it) and ``verify`` (verify_texts.py, which derives them again and compares) all call
it. An explanation's texts row is found by its place: ``texts_of`` writes one row per explanation,
in the entry's order, before the outputs, so the i-th row of a record is its i-th explanation; the
row's source, choice and token index are checked against the explanation's before a claim is tied
to it (a row that does not fit gets no claims, and ``verify`` reports them missing).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from nla_serve.audit.store.rows import ClaimRow
from nla_serve.audit.store.search import searchable

log = logging.getLogger("nla_serve.audit")

VERDICTS = ("supported", "unsupported", "contradicted")  # "unknown" in search: a claim without one
MARK = b'"claims":'  # in an entry's canonical JSON: only entries holding it are parsed
INSERT = "INSERT INTO claims (seq, text_row, idx, verdict, support, text) VALUES (?, ?, ?, ?, ?, ?)"


@dataclass(frozen=True)
class Claimed:
    """The claims of one explanation of an entry, as their search rows say them."""

    ordinal: int  # the explanation's place in the entry, and its texts row's among the record's rows
    source: str
    choice_index: int | None
    token_index: int | None
    text: str  # the explanation's search copy
    claims: tuple[tuple[int, str | None, float | None, str], ...]  # (idx, verdict, support, text)

    def fits(self, source, choice_index, token_index) -> bool:
        """Whether a texts row with these columns is this explanation's."""
        return (source, choice_index, token_index) == (self.source, self.choice_index, self.token_index)

    def rows(self, seq: int, text_row: int) -> list[ClaimRow]:
        return [ClaimRow(seq, text_row, i, v, s, t) for i, v, s, t in self.claims]


def explanation_claims(entry: dict) -> list[Claimed]:
    """The explanations of a signed entry that carry claims (in ``texts_of``'s terms)."""
    out = []
    for n, e in enumerate(entry.get("explanations") or []):
        claims = e.get("claims") if isinstance(e, dict) else None
        if not isinstance(claims, list) or not claims:
            continue
        rows = tuple((i, _verdict(c.get("verdict")), _number(c.get("support")), searchable(str(c.get("text") or "")))
                     for i, c in enumerate(claims) if isinstance(c, dict))
        out.append(Claimed(n, e.get("source") or "vector", e.get("choice_index"), e.get("token_index"),
                           searchable(e.get("text") or ""), rows))
    return out


def entry_claims(entry: bytes) -> list[Claimed]:
    """``explanation_claims`` of a stored entry; most entries hold none and are not parsed."""
    if MARK not in entry:
        return []
    try:
        parsed = json.loads(entry)
    except ValueError:
        return []  # an edited entry: verify reports the record itself
    return explanation_claims(parsed) if isinstance(parsed, dict) else []


def _verdict(v) -> str | None:
    return v if isinstance(v, str) else None


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def backfill(store) -> int:
    """Migration 2's data step: the claim rows of every record already in the log (inside the
    schema transaction). Reads each entry that mentions claims once; the number of rows written."""
    key, written = store.text_key, 0
    for record in store.iter_records():
        claimed = entry_claims(record.entry)
        if not claimed:
            continue
        rows = store.rows(f"SELECT {key}, source, choice_index, token_index FROM texts WHERE seq = ? ORDER BY {key}",
                          (record.seq,))
        out = []
        for c in claimed:
            if c.ordinal < len(rows) and c.fits(*rows[c.ordinal][1:]):
                out += c.rows(record.seq, int(rows[c.ordinal][0]))
            else:
                log.warning("audit migration: record #%d: no search row fits explanation %d; its claims are not "
                            "searchable (verify will say so)", record.seq, c.ordinal)
        if out:
            store.executemany(INSERT, [values_of(r) for r in out])
            written += len(out)
    return written


def values_of(r: ClaimRow) -> tuple:
    """A claim row's values in ``INSERT``'s order."""
    return r.seq, r.text_row, r.idx, r.verdict, r.support, r.text
