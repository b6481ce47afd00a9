"""The search rows checked against the signed records, as part of ``verify_log``.

Search answers from the ``texts`` table, which nothing signs: one row per explanation and per
choice's output, with the filters beside it. An edited, deleted or added row would let search hide
or misquote a record while every signature still verifies. So each record's rows are derived again
from its signed entry with ``record.texts_of`` (the function the writer stored them with, and the
writer's search copy ``searchable``) and compared, every column that search returns or filters on,
with the rows stored. A row that differs, is missing, or belongs to no record (a record deleted by
retention or otherwise, or one that never existed) is a problem naming the record and the row.

It lives beside verify.py, which owns the tree, the signatures and the checkpoints: ``verify_log``
hands it each position as it walks the log in seq order, and the stored rows are read in the same
order a batch at a time (``Store.iter_texts``), so memory holds one record's rows at a time.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

from nla_serve.audit.record import iso, texts_of
from nla_serve.audit.store import RecordRow, Store, TextRow, parse_time, searchable

FIELDS = ("seq", "record_id", "time", "model", "key_id", "source", "choice_index", "token_index", "token",
          "status", "fve", "grounding", "monitors", "text")
LISTED = 5  # problems named per record; further ones are counted
SHOWN = 48  # characters of a text shown in a problem


class TextsCheck:
    """Fed every position of the log in order (``record``, ``gone``), then ``finish``: appends a
    sentence to ``problems`` for each search row that the signed records do not account for."""

    def __init__(self, store: Store, problems: list[str]):
        self.store = store
        self.problems = problems
        self.checked = 0  # stored rows compared with a signed record
        self._rows = store.iter_texts()
        self._next = next(self._rows, None)

    def record(self, row: RecordRow, trusted: bool) -> None:
        """The record at ``row.seq``; ``trusted`` when its signature verified (an edited or forged
        record is reported itself, and its search rows cannot be checked against it)."""
        stored = self._rows_of(row.seq)
        if not trusted:
            return
        self.checked += len(stored)
        entry = json.loads(row.entry)
        t, signed = row.time, None
        if iso_or_none(row.time) != entry.get("time"):  # the row's time column was edited: the entry has the
            t = signed = parse_time(entry.get("time"))  # signed time, to the microsecond
        expected = [_values(x, searchable) for x in texts_of(entry, row.seq, t)]
        got = [_values(x, None, signed) for x in stored]
        self._add(row.seq, row.id, _compare(f"record #{row.seq} (id {row.id})", expected, got))

    def gone(self, seq: int, pruned: bool) -> None:
        """No record at ``seq`` (its leaf is in the tree): deleted by retention, or deleted."""
        stored = self._rows_of(seq)
        if stored:
            self._orphans(stored, "was deleted by retention" if pruned else "was deleted")

    def finish(self, size: int) -> None:
        """Rows of positions the walk did not reach: there is no such record (one appended while
        verify ran, by a server on the log, is not checked)."""
        while self._next is not None:
            group = self._group()
            if group[0].seq >= size and self.store.record_at(group[0].seq) is not None:
                continue
            self._orphans(group, "is not in the log")

    # -- reading ----------------------------------------------------------------------------------
    def _group(self) -> list[TextRow]:
        """The stored rows of the lowest position not read yet."""
        group = [self._next]
        self._next = next(self._rows, None)
        while self._next is not None and self._next.seq == group[0].seq:
            group.append(self._next)
            self._next = next(self._rows, None)
        return group

    def _rows_of(self, seq: int) -> list[TextRow]:
        while self._next is not None and self._next.seq < seq:  # a position the walk skipped
            self._orphans(self._group(), "is not in the log")
        return self._group() if self._next is not None and self._next.seq == seq else []

    # -- reporting --------------------------------------------------------------------------------
    def _orphans(self, group: list[TextRow], what: str) -> None:
        self._add(group[0].seq, group[0].record_id, [
            f"record #{t.seq} (id {t.record_id}) {what}, but its search row {_part(_values(t))} remains, saying "
            f"{_show(t.text)}" for t in group])

    def _add(self, seq: int, record_id, found: list[str]) -> None:
        self.problems.extend(found[:LISTED])
        if len(found) > LISTED:
            self.problems.append(f"record #{seq} (id {record_id}): {len(found) - LISTED} more problems with its "
                                 "search rows (not listed)")


def _values(t: TextRow, copy=None, signed: float | None = None) -> tuple:
    """A row's columns as compared: ``copy`` makes the stored search copy of text and token; a
    stored NaN or infinity is what the entry signs, null; ``signed``: the signed time (to the
    microsecond) when the records row's own time column cannot be trusted."""
    v = dict(zip(FIELDS, (getattr(t, f) for f in FIELDS)))
    if copy is not None:
        v["text"], v["token"] = copy(v["text"]), copy(v["token"])
    for f in ("fve", "grounding"):
        if isinstance(v[f], float) and not math.isfinite(v[f]):
            v[f] = None
    if signed is not None and iso_or_none(v["time"]) == iso_or_none(signed):
        v["time"] = signed
    return tuple(v[f] for f in FIELDS)


def _compare(name: str, expected: list[tuple], got: list[tuple]) -> list[str]:
    """Problems between one record's derived rows and its stored ones: equal rows pair off first,
    then rows of the same part (source, choice, token index) differ, and the rest are extra or missing."""
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
            missing[_ident(values)].append(values)
    out = []
    for values in unmatched:
        mates = missing.get(_ident(values))
        if mates:
            out.append(_differs(name, values, mates.pop(0)))
        else:
            out.append(f"{name} has an extra search row, {_part(values)}, saying {_show(values[-1])}, that its signed "
                       "record does not hold")
    for mates in missing.values():
        out += [f"the search row of {name}, {_part(v)}, is missing: search cannot find {_show(v[-1])}" for v in mates]
    return out


def _differs(name: str, stored: tuple, signed: tuple) -> str:
    fields = [(f, a, b) for f, a, b in zip(FIELDS, stored, signed) if a != b]
    said = " and ".join(f"{f} {_show(a, b)}" for f, a, b in fields)
    should = _show(fields[0][2], fields[0][1]) if len(fields) == 1 else \
        " and ".join(f"{f} {_show(b, a)}" for f, a, b in fields)
    return f"the search row of {name}, {_part(signed)}, says {said} but the signed record says {should}"


def iso_or_none(t) -> str | None:
    """A time as the entry writes it; None for what is no time (a tampered column)."""
    try:
        return iso(t)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _ident(values: tuple) -> tuple:
    return values[5], values[6], values[7]  # source, choice_index, token_index


def _part(values: tuple) -> str:
    """Which part of a record a row is: 'output of choice 0', 'completion explanation of choice 0 token 4'."""
    source, choice, token = _ident(values)
    if source == "output":
        return f"output of choice {choice}"
    where = [f"{k} {i}" for k, i in (("choice", choice), ("token", token)) if i is not None]
    return f"{source} explanation" + (" of " + " ".join(where) if where else "")


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
