"""What `nla-serve eval` measures of claims (issue 27's targets for a pair that claims only what
it can support), on the same explanations and vectors as the FVE report:

- verdicts: every claim of every explanation scored for support (``nla.support``, the server's
  own scoring) and judged by the pair's calibrated thresholds: the shares supported / unsupported /
  contradicted, overall and by kind of claim (the final token, the token before it, the next-token
  guess, the kind of text and topic, quoted phrases, other), each with its mean support;
- the final-token test: each explanation written twice, once saying the true final token and once
  a false one (one word changed, same template: ``The final token is "X".``); support separates
  them when the true one reconstructs the vector better (the two share the same ablation, so the
  difference in support is the difference in FVE). Every position counts where the explanation
  has a final-token sentence.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from nla_serve.nla.thresholds import SupportThresholds
    from nla_serve.nla.reconstructor import Reconstructor

FINAL = re.compile(r"The final token is (\"[^\"]*\"|a line break|a space|a double quotation mark(?: with \"[^\"]*\")?|"
                   r"part of a multi-byte character)[.,]")
KINDS = (("final_token", re.compile(r"\bfinal token\b", re.I)),
         ("previous_token", re.compile(r"\btoken before\b", re.I)),
         ("next_token", re.compile(r"\b(next|comes next|expects|best guess)\b", re.I)),
         ("topic", re.compile(r"\b(topic|about|genre|asking for|message|reply|text is)\b", re.I)),
         ("quote", re.compile(r"\"[^\"]{3,}\"")))
DECOYS = ('"the"', '"."', "a line break", '","', '"and"')  # false final tokens, the first one that differs


def kind_of(claim: str) -> str:
    for name, pattern in KINDS:
        if pattern.search(claim):
            return name
    return "other"


def true_final(tokenizer, token_id: int) -> str:
    from nla_serve.train.targets import show

    return show(tokenizer.decode([token_id]))


def claims_report(reconstructor: "Reconstructor", bodies: list[str], vectors: "torch.Tensor", baseline: float,
                  thresholds: "SupportThresholds | None", tokens: list[int], tokenizer) -> dict:
    """The verdict shares and the final-token test (see the module docstring) as one JSON-able dict."""
    from nla_serve.nla.support import score_explanations

    scored = score_explanations(reconstructor, bodies, vectors, baseline, claims=[True] * len(bodies),
                                claim_thresholds=thresholds)
    by_kind: dict[str, list[dict]] = {}
    for claims in scored.claims:
        for c in claims or []:
            by_kind.setdefault(kind_of(c["text"]), []).append(c)
    every = [c for cs in by_kind.values() for c in cs]
    report = {"n_claims": len(every), "thresholds": None if thresholds is None else
              {"supported": thresholds.supported, "contradicted": thresholds.contradicted,
               "by_place": [list(t) for t in thresholds.by_place]},
              "verdicts": verdict_shares(every),
              "by_kind": {k: {"n": len(v), "mean_support": mean_support(v), "verdicts": verdict_shares(v)}
                          for k, v in sorted(by_kind.items())}}
    report["final_token_test"] = final_token_test(reconstructor, bodies, vectors, baseline, tokens, tokenizer)
    return report


def verdict_shares(claims: list[dict]) -> dict:
    n = len(claims)
    if not n:
        return {}
    return {v: round(sum(c["verdict"] == v for c in claims) / n, 4)
            for v in ("supported", "unsupported", "contradicted", None) if v is not None} | {
        "unjudged": round(sum(c["verdict"] is None for c in claims) / n, 4)}


def mean_support(claims: list[dict]) -> float | None:
    values = [c["support"] for c in claims if c["support"] is not None]
    return round(sum(values) / len(values), 4) if values else None


def final_token_test(reconstructor: "Reconstructor", bodies: list[str], vectors: "torch.Tensor",
                     baseline: float, tokens: list[int], tokenizer) -> dict:
    import torch

    pairs, rows = [], []
    for i, (body, token) in enumerate(zip(bodies, tokens)):
        m = FINAL.search(body)
        if m is None:
            continue
        truth = true_final(tokenizer, token)
        decoy = next(d for d in DECOYS if d != truth)
        pairs.append((body[:m.start(1)] + truth + body[m.end(1):], body[:m.start(1)] + decoy + body[m.end(1):]))
        rows.append(i)
    if not pairs:
        return {"n": 0}
    texts = [t for pair in pairs for t in pair]
    index = torch.tensor([r for r in rows for _ in (0, 1)])
    scores = reconstructor.score(texts, vectors[index], baseline)
    gaps = [scores[2 * k].fve - scores[2 * k + 1].fve for k in range(len(pairs))]
    return {"n": len(pairs), "covered": round(len(pairs) / len(bodies), 4),
            "separated": round(sum(g > 0 for g in gaps) / len(gaps), 4),
            "mean_support_gap": round(sum(gaps) / len(gaps), 4)}
