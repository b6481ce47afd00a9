"""A causal test of an explanation: patch an edit of it back at the explained position and see
whether the model's next step follows (the published NLA protocol; ../shared/STEERING.md).

For the explanation E of the row h at position p and an edited E', the direction is
AR(E') - AR(E), added at p only as h + s |h| d/|d| (the steering rule). Two controls use the same
strength s: a neutral rewording E'' of E (AR(E'') - AR(E): does any rewrite move the model this
much?) when the client gives one, and a random direction (does any push of this size?). The
default s is |AR(E') - AR(E)| / |AR(E)|: the size of the edit as the reconstructor sees it,
relative to the activation it reconstructs.

Each variant is generated from the tokens up to p (greedy, so the continuations are matched by
construction) and compared with the unpatched run: the KL divergence of the next-token
distribution at p, its top tokens, and the continuation. vLLM reports at most 20 logprobs a
token, so KL is computed over the union of both runs' top 20 with the rest of each distribution
lumped into one outcome: a lower bound of the full KL (exact when the top 20 hold all the mass).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from typing import TYPE_CHECKING

from nla_serve.errors import ClientError
from nla_serve.steering.intervention import Intervention, PositionRule
from nla_serve.types import Prompt, SamplingOptions

if TYPE_CHECKING:
    import torch

    from nla_serve.service import Service

TOP = 20


def kl_lower_bound(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(P || Q) over the tokens in either top list plus one lumped "rest" outcome (logprobs in)."""
    support = set(p) | set(q)
    floor = -1e9
    pp = {t: math.exp(p.get(t, floor)) for t in support}
    qq = {t: math.exp(q.get(t, floor)) for t in support}
    pp["rest"] = max(0.0, 1 - sum(math.exp(v) for v in p.values()))
    qq["rest"] = max(0.0, 1 - sum(math.exp(v) for v in q.values()))
    # a token outside Q's top list has at most Q's smallest listed probability: use that, not 0
    q_floor = math.exp(min(q.values())) if q else 1e-12
    total = 0.0
    for t, a in pp.items():
        if a <= 0:
            continue
        b = qq[t] if (t in q or t == "rest") else min(q_floor, qq["rest"] or q_floor)
        total += a * math.log(a / max(b, 1e-12))
    return max(0.0, total)


async def run_variant(svc: "Service", ids: list[int], iv: Intervention | None, max_tokens: int, rid: str) -> dict:
    options = SamplingOptions(max_tokens=max_tokens, temperature=0.0, logprobs=TOP)
    tokens: list[int] = []
    first: dict[int, float] | None = None
    async for out in svc.target.generate(Prompt(ids), options, rid, capture=False, intervention=iv):
        tokens.extend(out.token_ids)
        if first is None and out.logprobs:
            lp = out.logprobs[0]
            first = {tid: v for tid, v in lp.top} | {lp.token_id: lp.logprob}
    first = first or {}
    top = sorted(first.items(), key=lambda kv: -kv[1])[:5]
    return {"tokens": tokens, "first": first,
            "top": [{"token": svc.tokenizer.decode([t]), "token_id": t, "prob": round(math.exp(v), 6)} for t, v in top],
            "continuation": svc.tokenizer.decode(tokens, skip_special_tokens=True)}


async def counterfactual(svc: "Service", ids: list[int], position: int, explanation: str, edited: str,
                         control: str | None, strength: float | None, max_tokens: int, seed: int, rid: str) -> dict:
    import torch

    texts = [explanation, edited] + ([control] if control is not None else [])
    vecs = await svc.nla.reconstruct(texts)
    original = vecs[0].double()
    edit = vecs[1].double() - original
    if not float(edit.norm()) > 0:
        raise ClientError("the edited explanation reconstructs to the same vector as the original: nothing to patch",
                          param="edited")
    s = float(strength) if strength is not None else float(edit.norm() / original.norm())
    limit = svc.settings.steering.max_strength
    if abs(s) > limit:
        raise ClientError(f"strength {s:.3f} is above this server's limit of {limit}", param="strength")
    directions = {"edited": edit}
    if control is not None:
        reword = vecs[2].double() - original
        if float(reword.norm()) > 0:
            directions["reworded"] = reword
    directions["random"] = torch.randn(original.shape[-1], generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64)
    prefix = ids[: position + 1]

    def patch(d: "torch.Tensor") -> Intervention:
        unit = (d / d.norm()).float()
        return Intervention(layer=svc.layer, directions=(tuple(unit.tolist()),), strengths=(s,),
                            rules=(PositionRule("explicit", frozenset({position})),), prompt_len=len(prefix),
                            max_ratio=svc.settings.steering.max_ratio)

    names = list(directions)
    runs = await asyncio.gather(run_variant(svc, prefix, None, max_tokens, f"{rid}-plain"),
                                *(run_variant(svc, prefix, patch(directions[n]), max_tokens, f"{rid}-{n}")
                                  for n in names))
    plain, variants = runs[0], runs[1:]
    out = []
    for name, v in zip(names, variants):
        unit = (directions[name] / directions[name].norm()).float()
        agree = sum(a == b for a, b in zip(plain["tokens"], v["tokens"]))
        out.append({"name": name, "direction_sha256": hashlib.sha256(unit.numpy().tobytes()).hexdigest(),
                    "kl": round(kl_lower_bound(plain["first"], v["first"]), 6), "top": v["top"],
                    "continuation": v["continuation"],
                    "first_token_changed": (plain["tokens"][:1] != v["tokens"][:1]),
                    "continuation_agreement": round(agree / max(1, len(plain["tokens"])), 4)})
    return {"object": "counterfactual", "layer": svc.layer, "position": position,
            "token": svc.tokenizer.decode([ids[position]]), "strength": round(s, 6),
            "strength_source": "given" if strength is not None else "|AR(edited) - AR(original)| / |AR(original)|",
            "read_before_steering": True,
            "baseline": {"top": plain["top"], "continuation": plain["continuation"]}, "variants": out,
            "kl_note": f"KL(unpatched || patched) of the next-token distribution at the position, over the union of "
                       f"both top {TOP} with the rest lumped: a lower bound"}
