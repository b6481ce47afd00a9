"""Search over the audit log: the query model, and the one function that answers it.

``GET /v1/audit/search`` and ``nla-serve audit search`` both parse their parameters with
``parse_query`` and answer with ``search_log``, so that the same query gives the same hits, in the same
order (newest first), with the same snippets, match positions and next cursor, whichever asks.
``find_hits`` is the SQL underneath. It is portable; each backend contributes only how terms are
matched (``Store.match_terms``: FTS5 trigram on SQLite, ``ILIKE`` over pg_trgm on PostgreSQL), its
placeholder style, and the name of the texts table's key (``Store.text_key``), which orders the
hits and is the paging cursor.

``verdict`` (supported | unsupported | contradicted | unknown, the last for a claim with no verdict)
keeps the explanations having a claim with that verdict (claims.py) and, with words, a claim with
that verdict holding every word: the words are then searched inside one claim, not across the
explanation. Such hits also list those claims (``claims``: text, support, verdict). Inside claims
words match as ``LIKE`` on SQLite (case folded for ASCII letters only, like its short terms) and
``ILIKE`` on PostgreSQL (``Store.like``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nla_serve.audit.store.rows import TextRow


class SearchQuery(BaseModel):
    """The filters of ``GET /v1/audit/search`` and ``nla-serve audit search``."""

    model_config = ConfigDict(extra="forbid")

    q: str | None = Field(default=None, max_length=512, description="words or phrases, all must occur (substring, any case)")
    since: float | None = Field(default=None, description="unix time or ISO 8601, inclusive")
    until: float | None = Field(default=None, description="unix time or ISO 8601, exclusive")
    model: str | None = None
    key_id: str | None = None
    status: str | None = None
    fve_min: float | None = None
    fve_max: float | None = None
    grounding_min: float | None = None
    grounding_max: float | None = None
    monitor: str | None = Field(default=None, description="a monitor rule's name")
    source: str | None = Field(default=None, pattern="^(prompt|completion|output|vector)$",
                               description="prompt | completion (explanations of tokens there), output (answers), vector")
    request_id: str | None = None
    verdict: str | None = Field(default=None, pattern="^(supported|unsupported|contradicted|unknown)$",
                                description="explanations with a claim of this verdict (unknown: none known); "
                                            "the words must then occur in that claim")
    limit: int = Field(default=20, ge=1, le=200)
    cursor: int | None = Field(default=None, ge=0, description="next_cursor of the previous page")

    @field_validator("since", "until", mode="before")
    @classmethod
    def _time(cls, v):
        return parse_time(v)

    @model_validator(mode="after")
    def _ranges(self):
        for lo, hi in (("fve_min", "fve_max"), ("grounding_min", "grounding_max"), ("since", "until")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{lo} ({a}) is above {hi} ({b})")
        return self

    def terms(self) -> list[str]:
        """Whitespace-separated terms; "double quotes" keep a phrase together."""
        if not self.q:
            return []
        q = searchable(self.q)
        return [a or b for a, b in re.findall(r'"([^"]+)"|(\S+)', q) if (a or b).strip()]


class QueryError(ValueError):
    """A search parameter that does not parse; ``param`` names it (None: the combination)."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def parse_query(params: Mapping) -> SearchQuery:
    """The query from HTTP query parameters or the CLI's flags (names as in SearchQuery)."""
    try:
        return SearchQuery(**dict(params))
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(map(str, err["loc"])) or None
        raise QueryError(f"{param}: {err['msg']}" if param else err["msg"], param) from None


def searchable(text: str | None) -> str | None:
    """The search copy of a text: NUL becomes U+FFFD. PostgreSQL text cannot hold NUL and FTS5
    queries cannot either; the signed entry keeps the exact text, so records and proofs are exact."""
    return text.replace("\x00", "\ufffd") if text else text


def parse_time(v):
    """Unix seconds, or an ISO 8601 time (a date alone is its midnight UTC; no zone means UTC)."""
    if v is None or isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
        try:
            t = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{v!r} is neither unix seconds nor an ISO 8601 time") from None
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
    raise ValueError("a time is unix seconds or an ISO 8601 string")


def snippet(text: str, terms: list[str], width: int = 160) -> tuple[str, list[int] | None]:
    """A window of ``text`` around the first term found, and the match's [start, end) in it."""
    low = text.casefold()
    found = [(low.find(t.casefold()), len(t)) for t in terms]
    found = [f for f in found if f[0] >= 0]
    if not found:
        return (text[:width] + ("…" if len(text) > width else "")), None
    at, n = min(found)
    start = max(0, at - (width - n) // 2)
    end = min(len(text), start + width)
    start = max(0, end - width)
    prefix = "…" if start > 0 else ""
    out = prefix + text[start:end] + ("…" if end < len(text) else "")
    return out, [len(prefix) + at - start, len(prefix) + at - start + n]


def iso(t: float) -> str:
    """A time as the records write it (``record.iso``; not imported: record.py imports this package)."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def like_escape(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass
class Hit:
    rowid: int
    row: TextRow


_TEXT_COLS = ("t.seq, t.record_id, t.time, t.model, t.key_id, t.source, t.choice_index, t.token_index, t.token, "
              "t.status, t.fve, t.grounding, t.monitors, t.text")
_SIMPLE = [("since", "time >= ?"), ("until", "time < ?"), ("model", "model = ?"), ("key_id", "key_id = ?"),
           ("status", "status = ?"), ("fve_min", "fve >= ?"), ("fve_max", "fve <= ?"),
           ("grounding_min", "grounding >= ?"), ("grounding_max", "grounding <= ?"), ("source", "source = ?"),
           ("request_id", "record_id = ?")]


def _filters(q: SearchQuery, store) -> tuple[list[str], list]:
    where, args = [], []
    for name, clause in _SIMPLE:
        value = getattr(q, name)
        if value is not None:
            where.append("t." + clause)
            args.append(value)
    if q.monitor is not None:
        where.append("t.monitors LIKE ? ESCAPE '\\'")
        args.append("%," + like_escape(q.monitor) + ",%")
    if q.verdict is not None:
        claims, claim_args = _claims_where(q, store)
        where.append(f"t.{store.text_key} IN (SELECT c.text_row FROM claims c WHERE {claims})")
        args += claim_args
    if q.cursor is not None:
        where.append(f"t.{store.text_key} < ?")
        args.append(q.cursor)
    return where, args


def _claims_where(q: SearchQuery, store) -> tuple[str, list]:
    """The claims ``q.verdict`` asks for, holding every word of ``q``."""
    where, args = ["c.verdict IS NULL" if q.verdict == "unknown" else "c.verdict = ?"], []
    if q.verdict != "unknown":
        args.append(q.verdict)
    for term in q.terms():
        where.append(f"c.text {store.like} ? ESCAPE '\\'")
        args.append("%" + like_escape(term) + "%")
    return " AND ".join(where), args


def find_hits(store, q: SearchQuery) -> list[Hit]:
    """The text rows matching ``q``, newest first (by the texts table's key), at most ``q.limit``."""
    key = store.text_key
    source, where, args = store.match_terms(q.terms())
    more, more_args = _filters(q, store)
    sql = (f"SELECT t.{key}, {_TEXT_COLS} FROM {source} WHERE {' AND '.join(where + more) or '1 = 1'} "
           f"ORDER BY t.{key} DESC LIMIT ?")
    return [Hit(int(r[0]), TextRow(int(r[1]), r[2], float(r[3]), *r[4:]))
            for r in store.rows(sql, (*args, *more_args, q.limit))]


def matched_claims(store, q: SearchQuery, hits: list[Hit]) -> dict[int, list[dict]]:
    """For a query with ``verdict``: each hit's claims that made it one, in order."""
    if q.verdict is None or not hits:
        return {}
    where, args = _claims_where(q, store)
    marks = ", ".join("?" for _ in hits)
    rows = store.rows(f"SELECT c.text_row, c.text, c.support, c.verdict FROM claims c WHERE c.text_row IN ({marks}) "
                      f"AND {where} ORDER BY c.text_row, c.idx", (*[h.rowid for h in hits], *args))
    out: dict[int, list[dict]] = {}
    for row, text, support, verdict in rows:
        out.setdefault(int(row), []).append({"text": text, "support": support, "verdict": verdict})
    return out


def hit_document(hit: Hit, terms: list[str], claims: list[dict] | None = None) -> dict:
    """One hit as the API returns it and ``nla-serve audit search --json`` prints it (``claims``:
    the claims a verdict filter matched)."""
    t = hit.row
    text, match = snippet(t.text, terms)
    doc = {"request_id": t.record_id, "seq": t.seq, "time": iso(t.time), "model": t.model, "key_id": t.key_id,
           "source": t.source, "choice_index": t.choice_index, "token_index": t.token_index, "token": t.token,
           "status": t.status, "fve": t.fve, "grounding": t.grounding,
           "monitors": [m for m in t.monitors.split(",") if m], "snippet": text, "match": match}
    if claims is not None:
        doc["claims"] = claims
    return doc


def search_log(store, q: SearchQuery) -> dict:
    """The one search: a page of hits for ``q`` and the cursor of the next page (None on the last)."""
    hits = find_hits(store, q)
    terms = q.terms()
    claims = matched_claims(store, q, hits)
    return {"object": "list",
            "data": [hit_document(h, terms, claims.get(h.rowid, []) if q.verdict else None) for h in hits],
            "next_cursor": hits[-1].rowid if len(hits) == q.limit else None}
