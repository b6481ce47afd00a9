"""The search rows checked against the signed records, as part of ``verify_log``.

Search answers from the ``texts`` table, which nothing signs: one row per explanation and per
choice's output, with the filters beside it; and from the ``claims`` table (store/claims.py), one
row per claim of an explanation, with its verdict and support. An edited, deleted or added row would
let search hide or misquote a record while every signature still verifies. So each record's rows
are derived again from its signed entry with ``record.texts_of`` and ``store.explanation_claims``
(the functions the writer stored them with, and the writer's search copy ``searchable``) and
compared, every column that search returns or filters on, with the rows stored. A row that
differs, is missing, or belongs to no record (a record deleted by retention or otherwise, or one
that never existed) is a problem naming the record and the row. A claim row is compared through the
texts row it is tied to: that row's record, source, choice and token index, and whether its text
holds the claim (a claim moved to another explanation is caught).

It lives beside verify.py, which owns the tree, the signatures and the checkpoints: ``verify_log``
hands it each position as it walks the log in seq order, and the stored rows are read in the same
order a batch at a time (``Store.iter_texts``, ``Store.iter_claims``), so memory holds one record's
rows at a time.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator

from nla_serve.audit.record import iso, texts_of
from nla_serve.audit.store import RecordRow, Store, TextRow, explanation_claims, parse_time, searchable

FIELDS = ("seq", "record_id", "time", "model", "key_id", "source", "choice_index", "token_index", "token",
          "status", "fve", "grounding", "monitors", "text")
# a claim row as compared: its texts row's seq, source, choice and token index, then its own columns,
# and whether that row's text holds it
CLAIM_FIELDS = ("seq", "source", "choice_index", "token_index", "idx", "verdict", "support", "text", "held")
LISTED = 5  # problems named per record and table; further ones are counted
SHOWN = 48  # characters of a text shown in a problem


class _BySeq:
    """Stored rows in seq order, handed out one position's group at a time."""

    def __init__(self, rows: Iterator, seq_of: Callable):
        self.rows, self.seq_of = rows, seq_of
        self.next = next(rows, None)

    def group(self) -> list:
        """The rows of the lowest position not read yet."""
        group, seq = [self.next], self.seq_of(self.next)
        self.next = next(self.rows, None)
        while self.next is not None and self.seq_of(self.next) == seq:
            group.append(self.next)
            self.next = next(self.rows, None)
        return group

    def of(self, seq: int, skipped: Callable[[list], None]) -> list:
        """The rows of ``seq``; the groups of lower positions (which the walk skipped) go to ``skipped``."""
        while self.next is not None and self.seq_of(self.next) < seq:
            skipped(self.group())
        return self.group() if self.next is not None and self.seq_of(self.next) == seq else []


class TextsCheck:
    """Fed every position of the log in order (``record``, ``gone``), then ``finish``: appends a
    sentence to ``problems`` for each search or claim row that the signed records do not account for."""

    def __init__(self, store: Store, problems: list[str]):
        self.store = store
        self.problems = problems
        self.checked = 0  # stored texts rows compared with a signed record
        self.claims_checked = 0  # stored claim rows compared with a signed record
        self._texts = _BySeq(store.iter_texts(), lambda t: t.seq)
        self._claims = _BySeq(store.iter_claims(), lambda c: c[0])

    def record(self, row: RecordRow, trusted: bool) -> None:
        """The record at ``row.seq``; ``trusted`` when its signature verified (an edited or forged
        record is reported itself, and its search rows cannot be checked against it)."""
        stored = self._texts.of(row.seq, lambda g: self._orphans(g, "is not in the log"))
        claims = self._claims.of(row.seq, lambda g: self._orphan_claims(g, "is not in the log"))
        if not trusted:
            return
        self.checked += len(stored)
        self.claims_checked += len(claims)
        entry = json.loads(row.entry)
        t, signed = row.time, None
        if iso_or_none(row.time) != entry.get("time"):  # the row's time column was edited: the entry has the
            t = signed = parse_time(entry.get("time"))  # signed time, to the microsecond
        expected = [_values(x, searchable) for x in texts_of(entry, row.seq, t)]
        got = [_values(x, None, signed) for x in stored]
        name = f"record #{row.seq} (id {row.id})"
        self._add(row.seq, row.id, _compare(name, expected, got, TEXTS), TEXTS)
        expected = [(row.seq, c.source, c.choice_index, c.token_index, i, v, s, text, text in c.text)
                    for c in explanation_claims(entry) for i, v, s, text in c.claims]
        self._add(row.seq, row.id, _compare(name, expected, [_claim_values(c) for c in claims], CLAIMS), CLAIMS)

    def gone(self, seq: int, pruned: bool) -> None:
        """No record at ``seq`` (its leaf is in the tree): deleted by retention, or deleted."""
        what = "was deleted by retention" if pruned else "was deleted"
        stored = self._texts.of(seq, lambda g: self._orphans(g, "is not in the log"))
        if stored:
            self._orphans(stored, what)
        claims = self._claims.of(seq, lambda g: self._orphan_claims(g, "is not in the log"))
        if claims:
            self._orphan_claims(claims, what)

    def finish(self, size: int) -> None:
        """Rows of positions the walk did not reach: there is no such record (one appended while
        verify ran, by a server on the log, is not checked)."""
        for stream, report in ((self._texts, self._orphans), (self._claims, self._orphan_claims)):
            while stream.next is not None:
                group = stream.group()
                seq = stream.seq_of(group[0])
                if seq >= size and self.store.record_at(seq) is not None:
                    continue
                report(group, "is not in the log")

    # -- reporting --------------------------------------------------------------------------------
    def _orphans(self, group: list[TextRow], what: str) -> None:
        self._add(group[0].seq, group[0].record_id, [
            f"record #{t.seq} (id {t.record_id}) {what}, but its search row {_part(_values(t))} remains, saying "
            f"{_show(t.text)}" for t in group], TEXTS)

    def _orphan_claims(self, group: list[tuple], what: str) -> None:
        seq = group[0][0]
        self._add(seq, None, [f"record #{seq} {what}, but its claim row, {_claim_part(v)}, remains, saying "
                              f"{_show(v[7])}" for v in map(_claim_values, group)], CLAIMS)

    def _add(self, seq: int, record_id, found: list[str], kind: "_Kind") -> None:
        self.problems.extend(found[:LISTED])
        if len(found) > LISTED:
            named = f"record #{seq}" + (f" (id {record_id})" if record_id is not None else "")
            self.problems.append(f"{named}: {len(found) - LISTED} more problems with its {kind.row}s (not listed)")


def _values(t: TextRow, copy=None, signed: float | None = None) -> tuple:
    """A row's columns as compared: ``copy`` makes the stored search copy of text and token; a
    stored NaN or infinity is what the entry signs, null; ``signed``: the signed time (to the
    microsecond) when the records row's own time column cannot be trusted."""
    v = dict(zip(FIELDS, (getattr(t, f) for f in FIELDS)))
    if copy is not None:
        v["text"], v["token"] = copy(v["text"]), copy(v["token"])
    for f in ("fve", "grounding"):
        v[f] = _finite(v[f])
    if signed is not None and iso_or_none(v["time"]) == iso_or_none(signed):
        v["time"] = signed
    return tuple(v[f] for f in FIELDS)


def _claim_values(stored: tuple) -> tuple:
    """A stored claim row (``Store.iter_claims``) as ``CLAIM_FIELDS``."""
    _, seq, source, choice, token, parent_text, idx, verdict, support, text = stored
    held = isinstance(parent_text, str) and isinstance(text, str) and text in parent_text
    return seq, source, choice, token, idx, verdict, _finite(support), text, held


def _finite(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


@dataclass(frozen=True)
class _Kind:
    """How one table's rows are compared and named in problems."""

    fields: tuple[str, ...]
    ident: Callable[[tuple], tuple]  # which part of a record a row is: rows of the same part differ
    part: Callable[[tuple], str]
    text: Callable[[tuple], str | None]
    row: str  # "search row" | "claim row"
    lost: str  # what a missing row takes from search


def _compare(name: str, expected: list[tuple], got: list[tuple], kind: _Kind) -> list[str]:
    """Problems between one record's derived rows and its stored ones: equal rows pair off first,
    then rows of the same part (source, choice, token index; for claims also the claim's place)
    differ, and the rest are extra or missing."""
    left = Counter(expected)
    unmatched = []
    for values in got:
        if left[values] > 0:
            left[values] -= 1
        else:
            unmatched.append(values)
    missing = defaultdict(list)
    for values in expected:
        if left[values] > 0:
            left[values] -= 1
            missing[kind.ident(values)].append(values)
    out = []
    for values in unmatched:
        mates = missing.get(kind.ident(values))
        if mates:
            out.append(_differs(name, values, mates.pop(0), kind))
        else:
            out.append(f"{name} has an extra {kind.row}, {kind.part(values)}, saying {_show(kind.text(values))}, "
                       "that its signed record does not hold")
    for mates in missing.values():
        out += [f"the {kind.row} of {name}, {kind.part(v)}, is missing: {kind.lost} {_show(kind.text(v))}"
                for v in mates]
    return out


def _differs(name: str, stored: tuple, signed: tuple, kind: _Kind) -> str:
    fields = [(f, a, b) for f, a, b in zip(kind.fields, stored, signed) if a != b]
    where = f"the {kind.row} of {name}, {kind.part(signed)},"
    if [f for f, _, _ in fields] == ["held"]:
        return f"{where} is tied to a search row whose text does not hold it"
    fields = [x for x in fields if x[0] != "held"]
    said = " and ".join(f"{f} {_show(a, b)}" for f, a, b in fields)
    should = _show(fields[0][2], fields[0][1]) if len(fields) == 1 else \
        " and ".join(f"{f} {_show(b, a)}" for f, a, b in fields)
    return f"{where} says {said} but the signed record says {should}"


def iso_or_none(t) -> str | None:
    """A time as the entry writes it; None for what is no time (a tampered column)."""
    try:
        return iso(t)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _ident(values: tuple) -> tuple:
    return values[5], values[6], values[7]  # source, choice_index, token_index


def _where(source, choice, token) -> str:
    """Which part of a record a row is: 'output of choice 0', 'completion explanation of choice 0 token 4'."""
    if source == "output":
        return f"output of choice {choice}"
    where = [f"{k} {i}" for k, i in (("choice", choice), ("token", token)) if i is not None]
    return f"{source} explanation" + (" of " + " ".join(where) if where else "")


def _part(values: tuple) -> str:
    return _where(*_ident(values))


def _claim_part(values: tuple) -> str:
    """'claim 2 of the completion explanation of choice 0 token 4' (of no search row: the row it is tied to is gone)."""
    _, source, choice, token, idx = values[:5]
    return f"claim {idx} of " + ("no search row" if source is None else f"the {_where(source, choice, token)}")


TEXTS = _Kind(FIELDS, _ident, _part, lambda v: v[-1], "search row", "search cannot find")
CLAIMS = _Kind(CLAIM_FIELDS, lambda v: v[1:5], _claim_part, lambda v: v[7], "claim row", "search by verdict cannot find")


def _show(value, other=None) -> str:
    """A value as a problem quotes it; a long text from just before where it differs from ``other``."""
    if value is None:
        return "null"
    if not isinstance(value, str):
        return repr(value)
    start = 0
    if isinstance(other, str):
        same = next((i for i, (a, b) in enumerate(zip(value, other)) if a != b), min(len(value), len(other)))
        start = max(0, same - SHOWN // 3)
    shown = value[start:start + SHOWN]
    return "'" + ("…" if start else "") + shown + ("…" if start + SHOWN < len(value) else "") + "'"
