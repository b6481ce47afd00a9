"""Evaluate an NLA pair on held-out activations: how much of v survives AR(AV(v)).

For each held-out vector the AV writes an explanation (greedy, the inference recipe), the AR
reconstructs the vector from it, and ``nla.reconstructor.score_vectors`` compares them (both
sqrt(d)-normalised): mse, cos, and ``fve = 1 - mse / baseline``. Reported as mean and median,
overall and per text source, with:

- the shuffled control: the same explanations scored against *other* vectors (a derangement). An
  explanation that carries information about its own vector must lose it here, so the control's
  FVE sits near or below zero; a high control means the AR ignores the text (it learnt the mean).
- the share of truncated outputs (no ``</explanation>``), of broken ones, and the mean length.
- grounding (explain/grounding.py, the server's own check): of everything the explanations quote,
  the share found in the text the activation saw or among the target's top next-token predictions
  at that position; overall and per source. High FVE with low grounding means the AV recites.
- claims (``evaluate_claims``): the verdict shares of every claim, by kind, and whether support
  tells a true final-token claim from a false one.
- examples: context, token, explanation and score, for reading.

Engines: ``batch`` (default) generates with ``train.generation`` (the recipe, many vectors per
forward, plain transformers); ``transformers`` and ``vllm`` go through ``NLARuntime``, the exact
server path. The folders are loaded and validated as the server does (LoRA folders merged first).
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from nla_serve.nla.reconstructor import score_vectors

if TYPE_CHECKING:
    import torch

    from nla_serve.train.activations import ActivationSet


def summary(xs: list[float]) -> dict:
    return {"mean": round(statistics.fmean(xs), 6), "median": round(statistics.median(xs), 6)} if xs else {}


def derangement(n: int, seed: int) -> list[int]:
    """A permutation with no fixed point (n >= 2)."""
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return [perm[(perm.index(i) + 1) % n] for i in range(n)] if n > 1 else perm


def stratified(records: list[dict], n: int, seed: int) -> list[int]:
    """Indices of ``n`` rows drawn evenly from each text source (round-robin over the sources, each
    shuffled with ``seed``), so a report covers chats and every corpus however the rows are ordered
    (held-out rows come grouped by source)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.get("source", ""), []).append(i)
    for name, idx in groups.items():
        random.Random(f"{seed}:{name}").shuffle(idx)
    queues = [groups[k] for k in sorted(groups)]
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return sorted(picked)


def fve_report(pred: "torch.Tensor", gold: "torch.Tensor", mse_scale: float, baseline: float) -> dict:
    """pred, gold: [N, d] -> {fve, cos, mse: {mean, median}} and the per-row scores."""
    scores = score_vectors(pred, gold, mse_scale, baseline)
    return {"fve": summary([s.fve for s in scores]), "cos": summary([s.cos for s in scores]),
            "mse": summary([s.mse for s in scores]), "rows": scores}


def verbalize(av_path: Path, ckpt, vectors: "torch.Tensor", *, engine: str, device: str, max_tokens: int) -> list:
    """-> list of (body, closed, tokens, broken) per vector."""
    from nla_serve.nla.verbalizer import STOP, broken_reason

    if engine == "batch":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nla_serve.train.generation import generate

        tok = AutoTokenizer.from_pretrained(av_path)
        model = AutoModelForCausalLM.from_pretrained(av_path, dtype=torch.float32).to(device).eval()
        av = ckpt.av
        # as the server verbalises (nla/verbalizer.py): the AV's known opening fed, the same stop
        samples = generate(model, tok, list(av.prompt_ids) + list(av.answer_prefix_ids), av.inject_at,
                           av.injection_scale, vectors, max_new_tokens=max_tokens, eos_ids=set(av.eos_ids),
                           temperature=0.0, stop=STOP)
        return [(s.body, s.closed, len(s.token_ids), broken_reason(s.body)) for s in samples]
    import asyncio

    import dataclasses

    from nla_serve.config import EngineSettings
    from nla_serve.nla.runtime import NLARuntime

    async def run():
        # the AV alone: scoring happens here, batched, with the AR under evaluation
        rt = await NLARuntime.open(dataclasses.replace(ckpt, ar=None),
                                   EngineSettings(model=str(av_path), kind=engine, device=device, dtype="float32"))
        try:
            verbs = await rt.verbalizer.verbalize(vectors, max_tokens=max_tokens)
        finally:
            await rt.close()
        return [(v.body, v.closed, v.tokens, v.broken) for v in verbs]

    return asyncio.run(run())


def evaluate(av_dir: str | Path, ar_dir: str | Path, acts: "ActivationSet", *, n: int = 200, engine: str = "batch",
             device: str = "cpu", max_tokens: int = 200, seed: int = 0, base: str | Path | None = None,
             cache_dir: str | Path | None = None, tokenizer=None, examples: int = 30) -> dict:
    """Score the pair on ``n`` rows of ``acts`` (already the held-out split), drawn evenly across its
    text sources (``stratified``)."""
    from dataclasses import replace

    from nla_serve.nla.checkpoint import load_nla
    from nla_serve.nla.lora import resolve_folder
    from nla_serve.nla.reconstructor import Reconstructor
    from nla_serve.train.calibrate import fve_baseline

    av_path = resolve_folder(av_dir, base=base, cache_dir=cache_dir)
    ar_path = resolve_folder(ar_dir, base=base, cache_dir=cache_dir)
    ckpt = load_nla(av_path, ar_path)
    rows = stratified(acts.records, n, seed)
    vectors, records = acts.vectors[rows], [acts.records[i] for i in rows]
    if len(records) < 2:
        raise ValueError(f"need at least 2 held-out activations to evaluate, got {len(records)}")
    if ckpt.d_model != vectors.shape[1]:
        raise ValueError(f"the activations are {vectors.shape[1]}-wide but the NLA's d_model is {ckpt.d_model}")
    baseline, source = ckpt.fve_baseline, ckpt.baseline_source
    if baseline is None:
        baseline, source = fve_baseline(vectors), "measured on these evaluation vectors (no calibrated baseline)"
        ckpt = replace(ckpt, fve_baseline=baseline, baseline_source=source)

    outs = verbalize(av_path, ckpt, vectors, engine=engine, device=device, max_tokens=max_tokens)
    bodies = [o[0] for o in outs]
    rec = Reconstructor(ckpt.ar, device=device, dtype="float32")
    pred = rec.reconstruct(bodies)  # [N, d]
    main = fve_report(pred, vectors, ckpt.ar.mse_scale, baseline)
    perm = derangement(len(bodies), seed)
    shuffled = fve_report(pred[perm], vectors, ckpt.ar.mse_scale, baseline)  # AR(text of j) vs v_i

    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(av_path)
    grounds = [grounding_of(tokenizer, r, b) for r, b in zip(records, bodies)]
    by_source: dict[str, list[float]] = {}
    grounding_by_source: dict[str, list] = {}
    by_genre: dict[str, list[float]] = {}
    grounding_by_genre: dict[str, list] = {}
    for r, s, g in zip(records, main["rows"], grounds):
        by_source.setdefault(r["source"], []).append(s.fve)
        grounding_by_source.setdefault(r["source"], []).append(g)
        if r.get("genre"):
            by_genre.setdefault(r["genre"], []).append(s.fve)
            grounding_by_genre.setdefault(r["genre"], []).append(g)
    report = {
        "n": len(records), "layer": ckpt.layer, "d_model": ckpt.d_model,
        "baseline": round(baseline, 6), "baseline_source": source, "engine": engine, "max_tokens": max_tokens,
        "fve": main["fve"], "cos": main["cos"], "mse": main["mse"],
        "shuffled": {"fve": shuffled["fve"], "cos": shuffled["cos"], "mse": shuffled["mse"]},
        "truncated_share": round(sum(not o[1] for o in outs) / len(outs), 4),
        "broken_share": round(sum(o[3] is not None for o in outs) / len(outs), 4),
        "mean_tokens": round(statistics.fmean(o[2] for o in outs), 2),
        "mean_words": round(statistics.fmean(len(b.split()) for b in bodies), 2),
        "grounding": grounding_summary(grounds),
        "by_source": {k: {"n": len(v), "fve": summary(v), "grounding": grounding_summary(grounding_by_source[k])}
                      for k, v in sorted(by_source.items())},
        "av": str(av_dir), "ar": str(ar_dir),
    }
    from nla_serve.train.evaluate_claims import claims_report

    # claim verdicts and the final-token test, on the same explanations (train/evaluate_claims.py)
    report["claims"] = claims_report(rec, bodies, vectors, baseline, ckpt.claim_thresholds,
                                     [r["token"] for r in records], tokenizer)
    if by_genre:
        report["by_genre"] = {k: {"n": len(v), "fve": summary(v), "grounding": grounding_summary(grounding_by_genre[k])}
                              for k, v in sorted(by_genre.items())}
    if examples:
        shown = stratified(records, examples, seed + 1)  # a few of each source, not the first few
        report["examples"] = [{
            "source": records[i]["source"], "genre": records[i].get("genre"), "doc": records[i]["doc"],
            "pos": records[i]["pos"],
            "context": tokenizer.decode(records[i]["prefix_ids"][-24:], skip_special_tokens=False),
            "token": tokenizer.decode([records[i]["token"]]), "explanation": outs[i][0], "closed": outs[i][1],
            "fve": round(main["rows"][i].fve, 4), "cos": round(main["rows"][i].cos, 4),
            "grounding": grounds[i].as_dict(),
        } for i in shown]
    return report


def last_tokens(tokenizer, ids: list[int]) -> list[str]:
    """The texts of the last two tokens of ``ids`` (grounding finds a quote that is one of them)."""
    return [tokenizer.decode([t], skip_special_tokens=False) for t in ids[-2:]]


def grounding_of(tokenizer, rec: dict, body: str):
    """The server's grounding check of one explanation against what its activation saw."""
    from nla_serve.explain.grounding import ground

    context = tokenizer.decode(rec["prefix_ids"], skip_special_tokens=False)
    predictions = [tokenizer.decode([t]) for t, _ in rec.get("top") or []]
    return ground(body, context, predictions, last_tokens(tokenizer, rec["prefix_ids"]))


def grounding_summary(grounds: list) -> dict:
    quotes = sum(g.quotes for g in grounds)
    grounded = sum(len(g.found) + len(g.predicted) for g in grounds)
    scores = [g.score for g in grounds if g.score is not None]
    return {"quotes": quotes, "quotes_grounded": round(grounded / quotes, 4) if quotes else None,
            "mean_score": round(statistics.fmean(scores), 4) if scores else None,
            "explanations_quoting": round(len(scores) / len(grounds), 4) if grounds else None}


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
