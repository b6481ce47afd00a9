"""`make bench`'s load section: explanations under load, and the answers beside them, measured as
an operator would see them on one machine in one run.

On a service (the default model with its shipped NLA, or the tiny pair in tests):

1. plain streams alone: ``probes`` streamed answers without explanations, one after another:
   time to first token, inter-token latency, end to end;
2. explained load: ``streams`` concurrent streamed answers with the server's default explanation
   policy, each followed at once by the next, for ``seconds``; meanwhile the same plain probes
   run again, one after another. Reported: explanations finished per second (status ok or
   truncated: written and scored) and
   verbaliser tokens per second over the window, mean FVE and FVE per verbaliser token of those
   explanations, how many were skipped (deadline, queue) or failed, token-to-explanation p50/p95,
   and the probes' TTFT, ITL and end to end under load against alone (the ratios).

Everything runs in-process through the same Service and generation pipeline as the HTTP server.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from nla_serve.events import ExplanationEvent, TokenEvent
from nla_serve.explain.policy import make_plan
from nla_serve.generation import GenerationRequest, run
from nla_serve.model_folder import chat_ids
from nla_serve.service import Service
from nla_serve.types import SamplingOptions

TOPICS = ["the history of Rome", "the sea", "sorting a list in Python", "photosynthesis", "sleeping well",
          "gravity", "France", "cats", "volcanoes", "bread", "chess", "bees", "trains", "the moon", "glass", "tea"]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 4)


def question(i: int) -> str:
    # a new question each time: a repeated one would be answered from the explanation cache
    return f"Tell me something about {TOPICS[i % len(TOPICS)]} (number {i})."


async def one_stream(svc: Service, i: int, max_tokens: int, explain: bool, tag: str) -> dict:
    plan = make_plan(None if explain else False, svc.settings.explain)
    if explain:
        plan = plan.streamed(max_tokens)
    req = GenerationRequest(f"bench-load-{tag}-{i}-{time.time_ns()}", chat_ids(svc.tokenizer, question(i)),
                            SamplingOptions(max_tokens=max_tokens, temperature=0.7), plan)
    P = len(req.prompt_ids)
    first = last = None
    gaps: list[float] = []
    seen: dict[int, float] = {}  # position -> when its token reached us
    explanations: list[dict] = []
    generated = 0
    with svc.admission.admit() as ticket:  # as the HTTP handler does
        async for ev in run(svc, req, ticket):
            now = time.monotonic()
            if isinstance(ev, TokenEvent) and ev.token_ids:
                if first is None:
                    first = now
                else:
                    gaps.append((now - last) / len(ev.token_ids))
                last = now
                for j in range(len(ev.token_ids)):
                    seen[P + generated + j] = now
                generated += len(ev.token_ids)
            elif isinstance(ev, ExplanationEvent) and ev.position is not None:
                e = ev.explanation
                since = first if ev.position < P else seen.get(ev.position)
                explanations.append({"status": str(getattr(e.status, "value", e.status)), "fve": e.fve,
                                     "tokens": e.tokens, "at": now,
                                     "latency": None if since is None else now - since})
    end = time.monotonic()
    return {"ttft": None if first is None else first - req.arrived, "itl": gaps, "e2e": end - req.arrived,
            "tokens": generated, "explanations": explanations}


def probe_summary(runs: list[dict]) -> dict:
    return {"requests": len(runs), "ttft_p50_s": pct([r["ttft"] for r in runs if r["ttft"] is not None], 0.5),
            "itl_p50_s": pct([g for r in runs for g in r["itl"]], 0.5),
            "itl_p95_s": pct([g for r in runs for g in r["itl"]], 0.95),
            "e2e_p50_s": pct([r["e2e"] for r in runs], 0.5)}


async def probes(svc: Service, n: int, max_tokens: int, start: int, until: float | None = None) -> list[dict]:
    out = []
    for k in range(n):
        if until is not None and time.monotonic() > until:
            break
        out.append(await one_stream(svc, start + k, max_tokens, explain=False, tag="probe"))
    return out


async def explanation_load(svc: Service, *, streams: int, seconds: float, max_tokens: int = 64,
                           probe_count: int = 6) -> dict:
    svc.worker.cache = type(svc.worker.cache)(0)  # measure work, not the cache
    await probes(svc, 1, max_tokens, 10_000)  # warm-up
    alone = await probes(svc, probe_count, max_tokens, 20_000)
    results: list[dict] = []
    t0 = time.monotonic()
    until = t0 + seconds

    async def stream_worker(k: int) -> None:
        i = 0
        while time.monotonic() < until:
            results.append(await one_stream(svc, 100_000 * (k + 1) + i, max_tokens, explain=True, tag="load"))
            i += 1

    async def delayed_probes() -> list[dict]:
        await asyncio.sleep(min(10.0, seconds / 4))  # once the load has filled the verbaliser
        return await probes(svc, probe_count, max_tokens, 30_000, until=until)

    *_, under = await asyncio.gather(*(stream_worker(k) for k in range(streams)), delayed_probes())
    exps = [e for r in results for e in r["explanations"]]
    window = [e for e in exps if t0 <= e["at"] <= until]  # finished inside the window: a rate
    # written and scored: "truncated" (the verbaliser's token limit reached) is finished work too
    ok = [e for e in window if e["status"] in ("ok", "truncated")]
    fves = [e["fve"] for e in ok if e["fve"] is not None]
    toks = sum(e["tokens"] or 0 for e in ok)
    by_status: dict[str, int] = {}
    for e in exps:
        by_status[e["status"]] = by_status.get(e["status"], 0) + 1
    a, u = probe_summary(alone), probe_summary(under)
    ratio = {k: (round(u[k] / a[k], 3) if a[k] and u[k] else None) for k in ("ttft_p50_s", "itl_p50_s", "e2e_p50_s")}
    return {"streams": streams, "seconds": seconds, "max_tokens": max_tokens,
            "explained_requests": len(results), "explanations_by_status": by_status,
            "explanations_per_s": round(len(ok) / seconds, 3), "verbalizer_tokens_per_s": round(toks / seconds, 1),
            "mean_fve": round(statistics.mean(fves), 4) if fves else None,
            "mean_verbalizer_tokens": round(toks / len(ok), 1) if ok else None,
            "fve_per_verbalizer_token": round(statistics.mean(fves) / (toks / len(ok)), 5) if fves and toks else None,
            "token_to_explanation_p50_s": pct([e["latency"] for e in ok if e["latency"] is not None], 0.5),
            "token_to_explanation_p95_s": pct([e["latency"] for e in ok if e["latency"] is not None], 0.95),
            "answer_ttft_p50_s": pct([r["ttft"] for r in results if r["ttft"] is not None], 0.5),
            "plain_alone": a, "plain_under_load": u, "plain_ratio_under_load": ratio}
