"""Grounding: are the phrases an explanation quotes really there?

An explanation of the activation at position p may only know what the target saw (tokens 0..p)
and what the target was about to say (its next-token predictions at p). The server knows both,
so every quoted span of an explanation is checked against them:

    found      the span occurs in the text of tokens 0..p (the chat template included) as whole
               words, or is token p or p-1 itself (tokens can be parts of words)
    predicted  not in that text, but the text followed by one of the model's top next-token
               predictions at p contains it, or the span is such a token (``expects "Paris"``)
    unfound    neither: the verbalizer wrote a quote the activation never saw

``score`` = (found + predicted) / quotes, ``None`` when the explanation quotes nothing.

What counts as a quote: text between double quotes ("…", “…”), between single quotes used as
quotes (‘…’, or '…' not inside a word, so "don't" is no quote), and between backticks.
Matching is by whole words ("it" is not found inside "capital"), and ignores case, runs of
whitespace, the kind of quote or apostrophe, and punctuation or an ellipsis at the ends of the quote; an ellipsis inside a quote ("And the … said") splits it into
parts that must each be found, in order.

What it cannot check: paraphrase (claims that are not quoted, such as a topic or "the user asked
about cooking"), and whether a quote sits where the explanation says it does. Predictions are
passed in by the caller (None when unknown: the result says ``checked_predictions: false``); the
server has them at every explained position (docs/design.md). This module is pure (no torch, no
tokenizer): callers pass decoded text.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

MAX_QUOTE_CHARS = 400  # longer "quotes" are an unbalanced quote mark, not a quote

_QUOTE_PATTERNS = (
    re.compile(r'"([^"\n]{0,%d})"' % MAX_QUOTE_CHARS),
    re.compile(r"“([^”\n]{0,%d})”" % MAX_QUOTE_CHARS),
    re.compile(r"‘([^’\n]{0,%d})’" % MAX_QUOTE_CHARS),
    # a single quote opens only after a non-word character and closes only before one
    re.compile(r"(?<![\w'])'([^'\n]{0,%d})'(?![\w'])" % MAX_QUOTE_CHARS),
    re.compile(r"`([^`\n]{0,%d})`" % MAX_QUOTE_CHARS),
)
_ELLIPSIS = re.compile(r"\s*(?:\.\.\.+|…)\s*")
_FOLD = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "\u00a0": " "})
_EDGE_PUNCT = " \t\n.,;:!?\"'()[]{}"


@dataclass(frozen=True)
class Grounding:
    quotes: int
    found: tuple[str, ...] = ()
    predicted: tuple[str, ...] = ()
    unfound: tuple[str, ...] = ()
    checked_predictions: bool = False  # False: no next-token predictions were known at p

    @property
    def score(self) -> float | None:
        return None if self.quotes == 0 else (len(self.found) + len(self.predicted)) / self.quotes

    def as_dict(self) -> dict:
        return {"score": self.score, "quotes": self.quotes, "found": list(self.found),
                "predicted": list(self.predicted), "unfound": list(self.unfound),
                "checked_predictions": self.checked_predictions}


def quotes_in(text: str) -> list[str]:
    """Quoted spans of ``text`` in order of appearance (each pattern's spans, not overlapping)."""
    taken: list[tuple[int, int]] = []
    spans: list[tuple[int, str]] = []
    for pattern in _QUOTE_PATTERNS:
        for m in pattern.finditer(text):
            start, end = m.span()
            if any(start < b and a < end for a, b in taken):
                continue  # inside a quote another pattern already took
            if normalize(m.group(1)):
                taken.append((start, end))
                spans.append((start, m.group(1)))
    return [s for _, s in sorted(spans)]


def normalize(text: str) -> str:
    """Case-, whitespace-, quote-mark- and edge-punctuation-insensitive form of ``text``."""
    t = unicodedata.normalize("NFKC", text).translate(_FOLD).casefold()
    return " ".join(t.split()).strip(_EDGE_PUNCT)


def _word_edge(ch: str) -> bool:
    """Whether a quote ending in ``ch`` must end a word there. Scripts written without spaces
    (Chinese, Japanese, Thai) have no word boundaries to check."""
    if not (ch.isalnum() or ch == "_"):
        return False
    return ord(ch) < 0x2E80 and not 0x0E00 <= ord(ch) <= 0x0EFF


def _bounded(part: str) -> re.Pattern:
    """``part`` as a whole-word match: "it" is not found inside "capital"."""
    left = r"(?<!\w)" if _word_edge(part[0]) else ""
    right = r"(?!\w)" if _word_edge(part[-1]) else ""
    return re.compile(left + re.escape(part) + right)


def _occurs(quote: str, haystack: str) -> bool:
    """Every ellipsis-separated part of ``quote`` occurs in ``haystack`` (normalised) as whole
    words, in order."""
    at = 0
    parts = [normalize(p) for p in _ELLIPSIS.split(quote)]
    parts = [p for p in parts if p]
    if not parts:
        return False
    for part in parts:
        m = _bounded(part).search(haystack, at)
        if m is None:
            return False
        at = m.end()
    return True


def ground(explanation: str | None, context: str, predictions: Sequence[str] | None = None,
           tokens: Sequence[str] = ()) -> Grounding:
    """Check each quote of ``explanation`` against ``context`` (the text of tokens 0..p), the
    decoded top next-token ``predictions`` at p (None: unknown), and ``tokens``, the texts of the
    last tokens themselves (p-1 and p: a token may be part of a word, "the final token is "Error""
    in "NameError", "the token before it is "Name"")."""
    quotes = quotes_in(explanation or "")
    if not quotes:
        return Grounding(0, checked_predictions=predictions is not None)
    ctx = normalize(context)
    if isinstance(tokens, str):
        raise TypeError("tokens: a sequence of token texts, not one string")
    last = {normalize(t) for t in tokens} - {""}
    # the context continued by each predicted token: "...capital of France is" + " Paris"; a quote
    # that crosses the end of the context starts within its last MAX_QUOTE_CHARS characters
    tail = context[-2 * MAX_QUOTE_CHARS:]
    continued = [normalize(tail + tok) for tok in (predictions or ())]
    predicted_tokens = {normalize(tok) for tok in (predictions or ())} - {""}
    found, predicted, unfound = [], [], []
    for q in quotes:
        if _occurs(q, ctx) or normalize(q) in last:
            found.append(q)
        elif normalize(q) in predicted_tokens or any(_occurs(q, c) for c in continued):
            predicted.append(q)
        else:
            unfound.append(q)
    return Grounding(len(quotes), tuple(found), tuple(predicted), tuple(unfound),
                     checked_predictions=predictions is not None)
