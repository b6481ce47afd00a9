"""An explanation as claims, the explanation without each one, and the explanation with one more:
what support is measured on (``NLARuntime.score``, one reconstructor pass). A claim of the
explanation: FVE of the whole minus FVE without it (``without``). A user-written claim (a
hypothesis): FVE of the explanation with it appended (``appended``) minus FVE of the explanation.

Claims are lines, and within a line sentences: released NLAs write paragraphs, others one claim a
line. A sentence ends at ``.``, ``!`` or ``?`` (with any closing quotes or brackets after it)
followed by whitespace, but never inside a double-quoted span, so ``The final token is ".".`` is one
claim. Pure: no torch, no tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_CLAIMS = 12  # each claim costs one more reconstructor sequence; the rest stay in the last claim
_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s)")


@dataclass(frozen=True)
class Claim:
    text: str
    start: int  # its span in the explanation
    end: int


def split_claims(text: str) -> list[Claim]:
    """The claims of ``text`` in order, each stripped of surrounding whitespace (none when the text
    has no words)."""
    spans: list[tuple[int, int]] = []
    offset = 0
    for line in text.splitlines(keepends=True):
        start = offset
        for m in _END.finditer(line):
            if line.count('"', 0, m.start()) % 2 or line.count("“", 0, m.start()) > line.count("”", 0, m.start()):
                continue  # inside a quote
            spans.append((start, offset + m.end()))
            start = offset + m.end()
        spans.append((start, offset + len(line)))
        offset += len(line)
    claims = []
    for a, b in spans:
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        body = piece.strip()
        if any(ch.isalnum() for ch in body):
            claims.append(Claim(body, a + lead, a + lead + len(body)))
    if len(claims) > MAX_CLAIMS:  # one last claim holds the tail
        tail = claims[MAX_CLAIMS - 1]
        claims = claims[:MAX_CLAIMS - 1] + [Claim(text[tail.start:claims[-1].end], tail.start, claims[-1].end)]
    return claims


def appended(text: str, hypothesis: str) -> str:
    """``text`` with one more claim at its end, after one space (what a hypothesis is scored as,
    and what ``nla-serve calibrate`` scores foreign claims as, so their thresholds agree)."""
    return text.rstrip() + " " + hypothesis.strip()


def substituted(text: str, claim: Claim, other: str) -> str:
    """``text`` with ``claim`` replaced by ``other`` in its place (calibration's null for claims)."""
    return text[:claim.start] + other.strip() + text[claim.end:]


def without(text: str, claim: Claim) -> str:
    """``text`` with ``claim`` taken out and the whitespace around it closed up."""
    before, after = text[:claim.start].rstrip(), text[claim.end:].lstrip()
    if not before or not after:
        return before + after
    sep = "\n" if "\n" in text[len(before):claim.start] + text[claim.end:len(text) - len(after)] else " "
    return before + sep + after
