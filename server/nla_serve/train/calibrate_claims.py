"""Support thresholds of an NLA pair: what support a claim gets when it is *not* about the activation,
measured on held-out activations and stored in the sidecars, where ``nla/thresholds.py`` reads them
and the runtime turns support into a verdict (``nla/support.py``).

The null is foreign claims: the pair's own explanations of *other* held-out activations (a
derangement: never the activation's own), so they are in the AV's style, the only text the AR reads
well, but were written about another vector. Each is scored exactly as the server scores the
claims it stands in for:

- claims (``nla_serve.claim_thresholds``): claim k of the explanation E of v is replaced in place by
  the foreign explanation's claim k (its last when it has fewer: templated explanations say the same
  kind of thing at the same index), and its support is FVE(E with it) - FVE(E without claim k):
  the same ablation, at the same place, in a text of the same shape as a real claim's.
- hypotheses (``nla_serve.hypothesis_thresholds``): each foreign claim f (at most ``APPENDED`` per
  activation) is appended, and its support is FVE(E + " " + f) - FVE(E), as for a user's hypothesis.

The claims null is also kept per place: thresholds for the first claim of an explanation, the
second, ... (``by_place``, while at least ``PLACE_MIN`` foreign claims were measured there), since
taking out a claim costs a different amount at each place (the first claim of a templated
explanation names the token, and any token-shaped claim in its place regains much of what taking
it out lost, while a claim at the end is read alone), so one pooled quantile is too lenient for
the first place and too strict for the last. Later places and hypotheses use the pooled null.

A foreign claim identical to one of E's own is left out: it is not foreign (two verses share the
line "Archaic, King James-style scripture prose."). ``supported`` is the null's q-quantile (0.95 by
default) and ``contradicted`` its (1-q)-quantile, so a claim about another activation is called
supported about 5% of the times and contradicted about 5%; they are clamped to >= 0 and <= 0, so
that supported always means the claim raises FVE and contradicted that it lowers it.

What the null cannot do: a foreign claim that happens to be true of v as well (two verses about the
same people) still counts as null, which only makes ``supported`` more demanding; and user-written
hypotheses are not in the AV's style, so their support tends to be smaller than the AV's own claims'
and their verdicts lean to ``unsupported``: the thresholds bound false alarms, not misses.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

from nla_serve.explain.claims import appended, split_claims, substituted, without
from nla_serve.train.calibrate import update_sidecars
from nla_serve.train.evaluate import derangement, verbalize

if TYPE_CHECKING:
    import torch

    from nla_serve.nla.reconstructor import Reconstructor

APPENDED = 4  # foreign claims appended per activation (each is one more AR sequence)
PLACE_MIN = 50  # foreign claims measured at a place before that place gets thresholds of its own
NULLS = {"claim_thresholds": "foreign claim substituted for claim k: FVE(E with it) - FVE(E without claim k)",
         "hypothesis_thresholds": 'foreign claim appended: FVE(E + " " + it) - FVE(E)'}


def quantile(xs: list[float], q: float) -> float:
    """The q-quantile of ``xs``, linear between order statistics (numpy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class NullPlan:
    """The sequences the null needs, each scored once against its activation, and which two
    sequences' FVE difference each null support is."""

    def __init__(self) -> None:
        self.seqs: list[str] = []
        self.rows: list[int] = []
        self._index: dict[tuple[str, int], int] = {}
        self.pairs: dict[str, list[tuple[int, int]]] = {name: [] for name in NULLS}
        self.places: list[int] = []  # the place k of each claim_thresholds pair's claim

    def seq(self, text: str, row: int) -> int:
        key = (text, row)
        if key not in self._index:
            self._index[key] = len(self.seqs)
            self.seqs.append(text)
            self.rows.append(row)
        return self._index[key]


def null_plan(texts: list[str], donors: list[int]) -> NullPlan:
    """For each explanation ``texts[i]`` (of activation i) and its donor ``donors[i]`` (another
    activation's explanation): the substituted and appended foreign claims to score."""
    plan = NullPlan()
    claims = [split_claims(t) for t in texts]
    for i, text in enumerate(texts):
        mine, foreign = claims[i], claims[donors[i]]
        own = {c.text for c in mine}
        if not mine or not foreign:
            continue
        for k, c in enumerate(mine):
            f = foreign[min(k, len(foreign) - 1)]
            if f.text not in own:
                plan.pairs["claim_thresholds"].append((plan.seq(substituted(text, c, f.text), i),
                                                       plan.seq(without(text, c), i)))
                plan.places.append(k)
        for f in [f for f in foreign if f.text not in own][:APPENDED]:
            plan.pairs["hypothesis_thresholds"].append((plan.seq(appended(text, f.text), i), plan.seq(text, i)))
    return plan


def null_supports(reconstructor: "Reconstructor", texts: list[str], vectors: "torch.Tensor", baseline: float,
                  seed: int = 0) -> tuple[dict[str, list[float]], list[int]]:
    """The support foreign claims get, for claims and for hypotheses ([N, d] ``vectors``, one per
    text), and the place of each claim-null value in its explanation."""
    import torch

    plan = null_plan(texts, derangement(len(texts), seed))
    if not plan.seqs:
        return {name: [] for name in NULLS}, []
    scores = reconstructor.score(plan.seqs, vectors[torch.tensor(plan.rows)], baseline)
    return ({name: [scores[a].fve - scores[b].fve for a, b in pairs] for name, pairs in plan.pairs.items()},
            plan.places)


def by_place(values: list[float], places: list[int], q: float) -> list[dict]:
    """Thresholds for the claim at each place k = 0, 1, ... while at least ``PLACE_MIN`` foreign
    claims were measured there (the places after the last one use the pooled thresholds)."""
    out = []
    for k in range(max(places, default=-1) + 1):
        here = [v for v, at in zip(values, places) if at == k]
        if len(here) < PLACE_MIN:
            break
        hi, lo = max(quantile(here, q), 0.0), min(quantile(here, 1 - q), 0.0)
        if not lo < hi:
            break
        out.append({"supported": round(hi, 6), "contradicted": round(lo, 6), "n": len(here)})
    return out


def thresholds_of(values: list[float], q: float, *, baseline: float, activations: int, method: str,
                  measured_on: str) -> dict:
    """The sidecar block for one null: its quantiles as thresholds, and how they were measured."""
    if len(values) < 20:
        raise ValueError(f"only {len(values)} foreign claims to measure the null on; explain more held-out "
                         "activations (--claims-n)")
    hi, lo = quantile(values, q), quantile(values, 1 - q)
    supported, contradicted = max(hi, 0.0), min(lo, 0.0)
    if not contradicted < supported:
        raise ValueError("every foreign claim got support 0: the reconstructor does not read the claims, so "
                         "support cannot tell one claim from another")
    return {"supported": round(supported, 6), "contradicted": round(contradicted, 6), "quantile": q,
            "null_quantiles": [round(lo, 6), round(quantile(values, 0.5), 6), round(hi, 6)],
            "n": len(values), "activations": activations, "fve_baseline": round(baseline, 6), "method": method,
            "measured_on": measured_on}


def calibrate_thresholds(av_dir: Path, ar_dir: Path, vectors: "torch.Tensor", *, measured_on: str,
                         baseline: float | None = None, quantile_q: float = 0.95, max_tokens: int = 200,
                         seed: int = 0, device: str = "cpu", base: str | Path | None = None,
                         cache_dir: str | Path | None = None, write: bool = True) -> dict:
    """Explain ``vectors`` ([N, d], held out) with the pair, measure both nulls, and write
    ``nla_serve.claim_thresholds`` / ``hypothesis_thresholds`` into both sidecars (``write``).
    ``baseline``: the FVE baseline support is measured in (default: the pair's own)."""
    from nla_serve.nla.checkpoint import load_nla
    from nla_serve.nla.lora import resolve_folder
    from nla_serve.nla.reconstructor import Reconstructor

    if not 0.5 < quantile_q < 1:
        raise ValueError(f"the quantile must be between 0.5 and 1, got {quantile_q}")
    if len(vectors) < 2:
        raise ValueError(f"need at least 2 held-out activations, got {len(vectors)}")
    av_path = resolve_folder(av_dir, base=base, cache_dir=cache_dir)
    ar_path = resolve_folder(ar_dir, base=base, cache_dir=cache_dir)
    ckpt = load_nla(av_path, ar_path)
    baseline = baseline if baseline is not None else ckpt.fve_baseline
    if baseline is None:
        raise ValueError(f"no FVE baseline for this pair ({ckpt.baseline_source}); calibrate the baseline first")
    ckpt = dataclasses.replace(ckpt, fve_baseline=baseline)
    outs = verbalize(av_path, ckpt, vectors, engine="batch", device=device, max_tokens=max_tokens)
    texts = [o[0] for o in outs]
    rec = Reconstructor(ckpt.ar, device=device, dtype="float32")
    nulls, places = null_supports(rec, texts, vectors, baseline, seed)
    blocks = {name: thresholds_of(values, quantile_q, baseline=baseline, activations=len(texts), method=NULLS[name],
                                  measured_on=measured_on) for name, values in nulls.items()}
    blocks["claim_thresholds"]["by_place"] = by_place(nulls["claim_thresholds"], places, quantile_q)
    if write:
        update_sidecars([Path(av_dir), Path(ar_dir)], blocks)
    return blocks
