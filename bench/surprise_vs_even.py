"""Where to spend explanations: ``positions: "surprise"`` against the evenly spaced ``"auto"``.

    python bench/surprise_vs_even.py [--prompts 24] [--max-tokens 64] [--out bench-results/surprise.json]

The default model with its shipped NLA answers the same chat prompts (greedy, so both policies
see the same answers) once per policy, 4 explanations per answer with claims; every explanation
is counted. Reported per policy: mean FVE, the share of claims supported and contradicted, and
how many of the explained positions the two policies share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from nla_serve.config import ServerSettings
from nla_serve.events import ExplanationEvent
from nla_serve.explain.options import ExplainOptions
from nla_serve.explain.policy import make_plan
from nla_serve.generation import GenerationRequest, run
from nla_serve.model_folder import chat_ids
from nla_serve.service import Service
from nla_serve.train.chats import chat_prompts
from nla_serve.types import SamplingOptions


async def answer(svc: Service, prompt: str, positions: str, max_tokens: int) -> list[dict]:
    plan = make_plan(ExplainOptions(positions=positions, max_explanations=4, claims=True), svc.settings.explain)
    req = GenerationRequest(f"bench-{positions}-{time.time_ns()}", chat_ids(svc.tokenizer, prompt),
                            SamplingOptions(max_tokens=max_tokens, temperature=0.0), plan)
    out = []
    with svc.admission.admit() as ticket:
        async for ev in run(svc, req, ticket):
            if isinstance(ev, ExplanationEvent) and ev.position is not None:
                e = ev.explanation
                out.append({"position": ev.position, "status": e.status, "fve": e.fve,
                            "verdicts": [c.get("verdict") for c in e.claims or []],
                            "text": e.text})
    return out


def summary(rows: list[dict]) -> dict:
    fves = [r["fve"] for r in rows if r["fve"] is not None]
    verdicts = [v for r in rows for v in r["verdicts"]]
    return {"explanations": len(rows), "scored": len(fves),
            "mean_fve": round(statistics.mean(fves), 4) if fves else None,
            "claims": len(verdicts),
            "claims_supported": round(verdicts.count("supported") / len(verdicts), 3) if verdicts else None,
            "claims_contradicted": round(verdicts.count("contradicted") / len(verdicts), 3) if verdicts else None}


async def measure(args) -> dict:
    svc = await Service.start(ServerSettings.flat(engine="vllm", max_model_len=1024))
    try:
        await svc.fingerprinted()
        svc.worker.cache = type(svc.worker.cache)(0)
        prompts = chat_prompts(args.prompts, seed=4242)
        runs: dict[str, list[list[dict]]] = {"surprise": [], "auto": []}
        for prompt in prompts:
            for policy in runs:
                runs[policy].append(await answer(svc, prompt, policy, args.max_tokens))
    finally:
        await svc.stop()
    shared = sum(len({r["position"] for r in a} & {r["position"] for r in b})
                 for a, b in zip(runs["surprise"], runs["auto"]))
    return {"prompts": len(prompts), "max_tokens": args.max_tokens,
            "surprise": summary([r for rows in runs["surprise"] for r in rows]),
            "auto": summary([r for rows in runs["auto"] for r in rows]),
            "positions_shared": shared,
            "examples": {p: [r["text"] for r in rows[0][:2]] for p, rows in runs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="bench-results/surprise.json")
    args = ap.parse_args()
    result = asyncio.run(measure(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("surprise", "auto", "positions_shared")}, indent=1))


if __name__ == "__main__":
    main()
