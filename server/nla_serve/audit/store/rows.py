"""The rows the audit store reads and writes, as plain dataclasses: a record, a search text, a claim
of an explanation, and the batch one group commit writes. They are shared by the writer (log.py), the record builder
(record.py), verification and search, and know nothing about SQL or about which database holds them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RecordRow:
    seq: int
    id: str
    time: float
    kind: str
    status: str
    model: str | None
    key_id: str | None
    entry: bytes
    sig: bytes


@dataclass
class TextRow:
    seq: int
    record_id: str
    time: float
    model: str | None
    key_id: str | None
    source: str  # "prompt" | "completion" (an explanation of a token there) | "output" (a choice's text)
    choice_index: int | None
    token_index: int | None
    token: str | None
    status: str | None
    fve: float | None
    grounding: float | None
    monitors: str  # ",rule,rule," so that a rule filter is one LIKE
    text: str


@dataclass
class ClaimRow:
    """One claim of an explanation (store/claims.py), tied to the explanation's search row."""

    seq: int
    text_row: int  # the key of its explanation's row in ``texts`` (``Store.text_key``)
    idx: int  # its place among the explanation's claims
    verdict: str | None  # "supported" | "unsupported" | "contradicted"; None: no verdict known
    support: float | None
    text: str


@dataclass
class Batch:
    """One group commit: records with their search texts, the tree nodes they completed, and
    maybe a checkpoint; ``prune_through`` deletes records ``<=`` that seq first (retention)."""

    records: list[RecordRow]
    texts: list[TextRow]
    nodes: list[tuple[int, int, bytes]]
    checkpoint: tuple[int, float, str] | None = None
    prune_through: int | None = None
