"""`python -m nla_serve.bench` (or `make bench`): throughput and latency, measured in one run.

For each model (``tiny``: the tiny random target + NLA; ``default``: SmolLM2-135M-Instruct with an
*untrained* NLA of its own architecture, AV = the target's weights, for speed only) it measures,
on the chosen engine:

1. generated tokens/s of N concurrent requests with capture off (an engine without capture), with
   capture on but nothing explained, and with the default explanation policy;
2. explanations/s and verbalizer tokens/s at 1, 8 and 32 concurrent requests (each generating a few
   tokens and asking for 4 explanations), through the worker versus one explanation at a time
   (worker concurrency 1);
   and the verbalizer's tokens/s at 16 concurrent jobs through the worker versus the same prompts
   sent straight to the verbalizer engine;
3. p50/p95 time to first token and token-to-explanation latency;
4. the load section (``bench_load.py``; the default model with its *shipped* NLA): explained
   streams for a while, explanations/s and FVE per verbaliser token, and plain streams' TTFT and
   ITL alone against under that load.

Everything runs in-process through the same Service and generation pipeline as the HTTP server
(no HTTP framing in the numbers). Results print as a table and go to a JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from nla_serve.bench_load import explanation_load, pct
from nla_serve.config import ServerSettings
from nla_serve.explain.options import ExplainOptions
from nla_serve.explain.policy import make_plan
from nla_serve.explain.worker import ExplanationWorker
from nla_serve.events import ExplanationEvent, TokenEvent
from nla_serve.generation import GenerationRequest, run
from nla_serve.service import Service
from nla_serve.types import Prompt, SamplingOptions

PROMPTS = ["Tell me about the history of Rome.", "Write a short poem about the sea.",
           "How do I sort a list in Python?", "What is photosynthesis?", "Give me three tips for sleeping well.",
           "Explain gravity to a child.", "What is the capital of France?", "Describe a cat in one paragraph."]


def prompt_ids(svc: Service, i: int) -> list[int]:
    from nla_serve.model_folder import chat_ids

    return chat_ids(svc.tokenizer, PROMPTS[i % len(PROMPTS)])


async def token_throughput(svc: Service, n: int, max_tokens: int, capture: bool) -> dict:
    opts = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i):
        g = 0
        async for out in svc.target.generate(Prompt(prompt_ids(svc, i)), opts, f"bench-{capture}-{i}-{time.time_ns()}",
                                             capture=capture):
            g += len(out.token_ids)
        return g

    await one(0)  # warm-up
    t0 = time.monotonic()
    total = sum(await asyncio.gather(*(one(i) for i in range(n))))
    dt = time.monotonic() - t0
    return {"requests": n, "tokens": total, "seconds": dt, "tokens_per_s": total / dt}


async def explained_requests(svc: Service, worker: ExplanationWorker, concurrency: int, per_request: int,
                             max_tokens: int, verbalizer_tokens: int) -> dict:
    svc.worker = worker
    worker.cache = type(worker.cache)(0)  # measure work, not the cache
    plan = make_plan(ExplainOptions(positions="all", max_explanations=per_request, max_tokens=verbalizer_tokens),
                     svc.settings.explain)
    ttft, lat, counts, vtoks = [], [], [], []

    async def one(i):
        req = GenerationRequest(f"bench-x-{i}-{time.time_ns()}", prompt_ids(svc, i),
                                SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), plan)
        first = None
        n = 0
        P = len(req.prompt_ids)
        seen: dict[tuple[int, int], float] = {}  # (choice, position) -> when its token reached us
        generated: dict[int, int] = {}  # choice -> tokens received so far
        with svc.admission.admit() as ticket:  # as the HTTP handler does
            async for ev in run(svc, req, ticket):
                now = time.monotonic()
                if isinstance(ev, TokenEvent) and ev.token_ids:
                    if first is None:
                        first = now
                        ttft.append(now - req.arrived)
                    k = generated.get(ev.index, 0)
                    for j in range(len(ev.token_ids)):
                        seen[(ev.index, P + k + j)] = now
                    generated[ev.index] = k + len(ev.token_ids)
                if isinstance(ev, ExplanationEvent) and ev.position is not None:
                    n += 1
                    vtoks.append(ev.explanation.tokens or 0)
                    # token-to-explanation: from the moment the explained token was out (a prompt
                    # position: the first token, when the prompt's rows exist) to its explanation
                    if ev.position < P:
                        lat.append(now - first)
                    elif (ev.choice_index, ev.position) in seen:
                        lat.append(now - seen[(ev.choice_index, ev.position)])
        counts.append(n)

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(concurrency)))
    dt = time.monotonic() - t0
    return {"concurrency": concurrency, "explanations": sum(counts), "seconds": dt,
            "explanations_per_s": sum(counts) / dt, "verbalizer_tokens_per_s": sum(vtoks) / dt,
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "token_to_explanation_p50": pct(lat, 0.5), "token_to_explanation_p95": pct(lat, 0.95)}


async def worker_vs_raw(svc: Service, jobs: int, verbalizer_tokens: int, rounds: int = 3) -> dict:
    """Verbalizer tokens/s of ``jobs`` explanations at once through the worker (continuous feeding,
    scoring off so only the verbalizer is measured, then on) against the same prompts sent straight
    to the verbalizer engine at the same concurrency; rounds alternate, medians are reported."""
    from statistics import median

    from nla_serve.engines import generate_all
    from nla_serve.explain.worker import ExplanationJob

    vectors = torch.randn(jobs, svc.nla.d_model, generator=torch.Generator().manual_seed(5))
    verbalizer = svc.nla.verbalizer
    prompts = [verbalizer.prompt_for(v) for v in vectors]
    options = verbalizer.sampling(max_tokens=verbalizer_tokens)

    async def raw() -> float:
        t0 = time.monotonic()
        done = await generate_all(svc.nla.engine, prompts, options, f"bench-raw-{time.time_ns()}")
        return sum(len(c.token_ids) for c in done) / (time.monotonic() - t0)

    async def through_worker(reconstruct: bool) -> float:
        w = ExplanationWorker(svc.nla, queue_size=4096, concurrency=jobs, cache_size=0)
        await w.start()
        t0 = time.monotonic()
        futures = [w.submit(ExplanationJob(f"bench-w-{i}", v, max_tokens=verbalizer_tokens, reconstruct=reconstruct))
                   for i, v in enumerate(vectors)]
        results = await asyncio.gather(*futures)
        dt = time.monotonic() - t0
        await w.stop()
        return sum(r.tokens for r in results) / dt

    await raw()  # warm-up
    runs: dict[str, list[float]] = {"raw": [], "worker": [], "worker_scored": []}
    for _ in range(rounds):
        runs["raw"].append(await raw())
        runs["worker"].append(await through_worker(False))
        runs["worker_scored"].append(await through_worker(True))
    med = {k: median(v) for k, v in runs.items()}
    return {"jobs": jobs, "verbalizer_tokens": verbalizer_tokens, "rounds": rounds,
            "raw_tokens_per_s": med["raw"], "worker_tokens_per_s": med["worker"],
            "worker_scored_tokens_per_s": med["worker_scored"],
            "worker_vs_raw": med["worker"] / med["raw"] - 1, "all_runs": runs}


def untrained_nla_for(model_dir: Path, root: Path, layer: int) -> tuple[Path, Path]:
    """An NLA of the target's own architecture with untrained behaviour: for measuring speed only."""
    import math
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer

    from nla_serve.nla.sidecar import ar_meta, av_meta, write_meta

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    d = cfg.hidden_size
    av, ar = root / "av", root / "ar"
    if not (av / "nla_meta.yaml").exists():
        shutil.copytree(model_dir, av, dirs_exist_ok=True)
        marker = next(c for c in "㊗ψ★§¶" if len(tok.encode(c, add_special_tokens=False)) == 1)
        write_meta(av / "nla_meta.yaml", av_meta(tok, layer, d, injection_scale=math.sqrt(d) * 4, marker=marker))
        ar.mkdir(parents=True, exist_ok=True)
        w = load_file(str(Path(model_dir) / "model.safetensors"))
        keep = {k: v for k, v in w.items() if not k.startswith(("lm_head", "model.norm"))
                and not any(f"layers.{i}." in k for i in range(layer + 1, cfg.num_hidden_layers))}
        save_file(keep, str(ar / "model.safetensors"), metadata={"format": "pt"})
        cfg.num_hidden_layers = layer + 1
        cfg.save_pretrained(ar)
        tok.save_pretrained(ar)
        save_file({"weight": torch.eye(d)}, str(ar / "value_head.safetensors"))
        meta = ar_meta(tok, layer, d, marker=marker)
        write_meta(ar / "nla_meta.yaml", meta)
    return av, ar


async def bench_model(name: str, settings: ServerSettings, args) -> dict:
    result: dict = {"model": name, "engine": settings.target.engine}
    plain = settings.model_copy(update={"nla": settings.nla.model_copy(update={"av": None, "ar": None})})
    t0 = time.monotonic()
    svc = await Service.start(plain)
    result["start_seconds_target_only"] = time.monotonic() - t0
    await svc.fingerprinted()  # a fresh folder's hashing would land on the first measurement
    result["capture_off"] = await token_throughput(svc, args.requests, args.max_tokens, capture=False)
    await svc.stop()

    t0 = time.monotonic()
    svc = await Service.start(settings)
    result["start_seconds_with_nla"] = time.monotonic() - t0
    await svc.fingerprinted()
    result["capture_on_nothing_explained"] = await token_throughput(svc, args.requests, args.max_tokens, capture=True)
    default_plan = await explained_requests(svc, svc.worker, args.requests, svc.settings.explain.max_explanations,
                                            args.max_tokens, args.verbalizer_tokens)
    result["default_policy"] = default_plan | {
        "tokens_per_s": args.requests * args.max_tokens / default_plan["seconds"]}
    off = result["capture_off"]["tokens_per_s"]
    result["capture_cost"] = 1 - result["capture_on_nothing_explained"]["tokens_per_s"] / off
    worker = svc.worker
    scaling = []
    for conc in args.concurrency:
        for mode, bs in (("batched", settings.worker.concurrency), ("one_at_a_time", 1)):
            w = ExplanationWorker(svc.nla, queue_size=4096, concurrency=bs, cache_size=0, metrics=svc.metrics)
            await w.start()
            r = await explained_requests(svc, w, conc, args.per_request, args.explain_gen_tokens,
                                         args.verbalizer_tokens)
            await w.stop()
            scaling.append(r | {"mode": mode})
            print(f"  {name}: {mode:>13} c={conc:<3} {r['explanations_per_s']:.2f} expl/s "
                  f"{r['verbalizer_tokens_per_s']:.1f} verbalizer tok/s", flush=True)
    svc.worker = worker
    result["explanations"] = scaling
    result["worker_vs_raw"] = wr = await worker_vs_raw(svc, 16, args.verbalizer_tokens)
    print(f"  {name}: verbalizer at 16 jobs: raw {wr['raw_tokens_per_s']:.1f} tok/s, through the worker "
          f"{wr['worker_tokens_per_s']:.1f} ({wr['worker_vs_raw']:+.1%}), scored {wr['worker_scored_tokens_per_s']:.1f}",
          flush=True)
    top = max(args.concurrency)
    b = next(r for r in scaling if r["concurrency"] == top and r["mode"] == "batched")
    o = next(r for r in scaling if r["concurrency"] == top and r["mode"] == "one_at_a_time")
    result[f"batched_speedup_at_{top}"] = b["explanations_per_s"] / o["explanations_per_s"]
    await svc.stop()
    return result


async def bench_load(settings: ServerSettings, args) -> dict:
    """The load section (bench_load.py) on its own service: the shipped NLA on the default model."""
    svc = await Service.start(settings)
    try:
        await svc.fingerprinted()
        return await explanation_load(svc, streams=args.load_streams, seconds=args.load_seconds,
                                      max_tokens=args.max_tokens, probe_count=args.load_probes)
    finally:
        await svc.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,default", help="comma list of: tiny, default")
    p.add_argument("--engine", default="vllm")
    p.add_argument("--requests", type=int, default=8, help="concurrent requests for tokens/s")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--per-request", type=int, default=4, help="explanations per request in the scaling runs")
    p.add_argument("--explain-gen-tokens", type=int, default=16,
                   help="tokens generated per request in the scaling runs (short: they measure explaining)")
    p.add_argument("--verbalizer-tokens", type=int, default=32)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--load-streams", type=int, default=24, help="explained streams in the load section (0: skip it)")
    p.add_argument("--load-seconds", type=float, default=90.0)
    p.add_argument("--load-probes", type=int, default=6, help="plain streams timed alone and under the load")
    p.add_argument("--skip-scaling", action="store_true", help="only the load section")
    p.add_argument("--out", default="bench-results/bench.json")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
               "args": {k: v for k, v in vars(args).items()}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "tiny":
                from nla_serve.tiny import build_all

                t = build_all(Path(tmp) / "tiny")
                s = ServerSettings.flat(model=str(t.target), nla_av=str(t.av), nla_ar=str(t.ar), engine=args.engine,
                                        dtype="float32", fve_baseline=1.0, max_model_len=512)
            else:
                from nla_serve.provision import default_model_dir

                md = default_model_dir()
                av, ar = untrained_nla_for(md, Path(tmp) / "default-nla", layer=20)
                s = ServerSettings.flat(model=str(md), nla_av=str(av), nla_ar=str(ar), engine=args.engine,
                                        fve_baseline=1.0, max_model_len=1024)
            print(f"== {name} on {args.engine}", flush=True)
            r = {"model": name} if args.skip_scaling else asyncio.run(bench_model(name, s, args))
            if not args.skip_scaling:
                print(f"  tokens/s: capture off {r['capture_off']['tokens_per_s']:.1f}, capture on "
                      f"{r['capture_on_nothing_explained']['tokens_per_s']:.1f} (cost {100 * r['capture_cost']:.1f}%), "
                      f"default policy {r['default_policy']['tokens_per_s']:.1f}; batched speedup at "
                      f"{max(args.concurrency)}: {r[f'batched_speedup_at_{max(args.concurrency)}']:.2f}x", flush=True)
            if args.load_streams > 0:
                # the default model's load runs with its shipped NLA (explanations worth reading, their
                # real length), not the untrained speed-only pair above
                load_settings = s if name == "tiny" else ServerSettings.flat(engine=args.engine, max_model_len=1024)
                r["load"] = ld = asyncio.run(bench_load(load_settings, args))
                print(f"  load: {ld['streams']} explained streams for {ld['seconds']:.0f} s: "
                      f"{ld['explanations_per_s']:.2f} expl/s, {ld['verbalizer_tokens_per_s']:.1f} verbalizer tok/s, "
                      f"mean FVE {ld['mean_fve']}, plain streams under load / alone: {ld['plain_ratio_under_load']}",
                      flush=True)
            results["runs"].append(r)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
