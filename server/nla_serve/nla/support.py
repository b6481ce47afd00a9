"""Claim support, scored in the same reconstructor pass as FVE: each explanation that asks for it
is split into claims (``explain/claims.py``) and the AR also reads the explanation without each
claim. A claim's support is the FVE it adds: FVE(whole) - FVE(without it), in FVE units, so a claim
the activation carries raises it, one the activation contradicts lowers it, and an invented detail
the AR cannot tell from nothing leaves it near 0.

What support measures is the reconstructor's view: a claim is supported when the AR's vector of
the text moves toward the activation with it. It cannot tell a true claim the AR never learned to
read from an invented one, and it needs the FVE baseline (without one, support is null like FVE).
Verdicts (supported / unsupported / contradicted) need thresholds calibrated per NLA; until a pair
carries them, ``verdict`` is null and the number is the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nla_serve.explain.claims import split_claims, without

if TYPE_CHECKING:
    import torch

    from nla_serve.nla.reconstructor import Reconstructor, Score


def score_with_claims(reconstructor: "Reconstructor", texts: list[str], vectors: "torch.Tensor",
                      baseline: float | None, wants: list[bool]) -> "tuple[list[Score], list[list[dict] | None]]":
    """Score ``texts`` against ``vectors`` ([N, d]); for each text with ``wants``, its claims with their
    support. One ``Reconstructor.score`` call for all the sequences (the batching is the AR's)."""
    import torch

    seqs: list[str] = list(texts)
    rows: list[int] = list(range(len(texts)))  # which vector each sequence is scored against
    ablations: list[list[tuple[str, int]]] = []  # per text: (claim, index of its ablated sequence)
    for i, (text, want) in enumerate(zip(texts, wants)):
        mine = []
        if want:
            for claim in split_claims(text):
                mine.append((claim.text, len(seqs)))
                seqs.append(without(text, claim))
                rows.append(i)
        ablations.append(mine)
    scores = reconstructor.score(seqs, vectors[torch.tensor(rows)], baseline)
    claims: list[list[dict] | None] = []
    for i, mine in enumerate(ablations):
        if not wants[i]:
            claims.append(None)
            continue
        whole = scores[i].fve
        claims.append([{"text": text, "support": None if whole is None or scores[j].fve is None
                        else round(whole - scores[j].fve, 6), "verdict": None} for text, j in mine])
    return scores[:len(texts)], claims
