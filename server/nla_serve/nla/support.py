"""Support, scored in the same reconstructor pass as FVE, and the verdict it earns.

Claims of the explanation (``explain.claims``): each explanation that asks is split into claims
(``explain/claims.py``) and the AR also reads the explanation without each claim. A claim's
support is the FVE it adds: FVE(whole) - FVE(without it).

Hypotheses (user-written claims, ``hypotheses`` on ``/v1/explanations``): the AR also reads the
explanation with each hypothesis appended; its support is FVE(explanation + " " + hypothesis) -
FVE(explanation). Both are in FVE units, so one the activation carries raises FVE, one it
contradicts lowers it, and one the AR cannot tell from nothing leaves it near 0.

What support measures is the reconstructor's view: a claim is supported when the AR's vector of
the text moves toward the activation with it. It cannot tell a true claim the AR never learned to
read from an invented one, and it needs the FVE baseline (without one, support is null like FVE).

Verdicts: ``supported`` when support >= the pair's ``supported`` threshold, ``contradicted`` when
<= its ``contradicted`` threshold, else ``unsupported``; a claim is judged by the thresholds of its
place in the explanation where the pair has them (the first claim, the second, ...), else by the
pooled ones; the thresholds are quantiles of the support
foreign claims get (``train/calibrate_claims.py``), read from the sidecars (``nla/thresholds.py``).
Without thresholds, or without a support number, ``verdict`` is null.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from nla_serve.explain.claims import appended, split_claims, without

if TYPE_CHECKING:
    import torch

    from nla_serve.nla.thresholds import SupportThresholds
    from nla_serve.nla.reconstructor import Reconstructor, Score


def verdict(support: float | None, thresholds: "SupportThresholds | None", place: int | None = None) -> str | None:
    """The verdict of one support number under a pair's thresholds, for the claim at ``place`` in its
    explanation (None: a hypothesis, or any place; no number or no thresholds: None)."""
    if support is None or thresholds is None:
        return None
    supported, contradicted = thresholds.at(place)
    if support >= supported:
        return "supported"
    if support <= contradicted:
        return "contradicted"
    return "unsupported"


@dataclass
class Scored:
    """One scoring pass: a score per text, and per text its claims and hypotheses (None where not asked)."""

    scores: "list[Score]"
    claims: list[list[dict] | None] = field(default_factory=list)
    hypotheses: list[list[dict] | None] = field(default_factory=list)


def _support(whole: float | None, other: float | None) -> float | None:
    return None if whole is None or other is None else round(whole - other, 6)


def score_explanations(reconstructor: "Reconstructor", texts: list[str], vectors: "torch.Tensor",
                       baseline: float | None, *, claims: list[bool],
                       hypotheses: Sequence[Sequence[str]] | None = None,
                       claim_thresholds: "SupportThresholds | None" = None,
                       hypothesis_thresholds: "SupportThresholds | None" = None) -> Scored:
    """Score ``texts`` against ``vectors`` ([N, d]); for each text with ``claims[i]``, its claims with
    their support and verdict; for each text with ``hypotheses[i]``, those with theirs. One
    ``Reconstructor.score`` call for all the sequences (the batching is the AR's)."""
    import torch

    hypotheses = hypotheses or [()] * len(texts)
    seqs: list[str] = list(texts)
    rows: list[int] = list(range(len(texts)))  # which vector each sequence is scored against
    # per text: (claim text, index of its sequence), for its claims (ablated) and hypotheses (appended)
    ablations: list[list[tuple[str, int]]] = []
    additions: list[list[tuple[str, int]]] = []

    def add(seq: str, i: int) -> int:
        seqs.append(seq)
        rows.append(i)
        return len(seqs) - 1

    for i, text in enumerate(texts):
        ablations.append([(c.text, add(without(text, c), i)) for c in split_claims(text)] if claims[i] else [])
        additions.append([(h, add(appended(text, h), i)) for h in hypotheses[i]])
    scores = reconstructor.score(seqs, vectors[torch.tensor(rows)], baseline)
    out = Scored(scores[:len(texts)])
    for i in range(len(texts)):
        whole = scores[i].fve
        mine = [(t, _support(whole, scores[j].fve)) for t, j in ablations[i]]
        out.claims.append([{"text": t, "support": s, "verdict": verdict(s, claim_thresholds, k)}
                           for k, (t, s) in enumerate(mine)] if claims[i] else None)
        added = [(h, _support(scores[j].fve, whole)) for h, j in additions[i]]
        out.hypotheses.append([{"text": h, "support": s, "verdict": verdict(s, hypothesis_thresholds)}
                               for h, s in added] if hypotheses[i] else None)
    return out


def score_with_claims(reconstructor: "Reconstructor", texts: list[str], vectors: "torch.Tensor",
                      baseline: float | None, wants: list[bool],
                      thresholds: "SupportThresholds | None" = None) -> "tuple[list[Score], list[list[dict] | None]]":
    """``score_explanations`` with claims only: (scores, claims per text)."""
    scored = score_explanations(reconstructor, texts, vectors, baseline, claims=wants, claim_thresholds=thresholds)
    return scored.scores, scored.claims
