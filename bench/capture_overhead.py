"""What layer-K capture costs the vLLM engine: generated tokens/s with capture on vs off.

Builds a random Llama (default: 8 blocks, hidden 256, vocab 512), or takes ``--model DIR``; starts
one ``VLLMEngine`` per capture method and one without, all at once, then times batches of
concurrent greedy requests (fixed length, ``ignore_eos``), the configurations taking turns round
after round (median of ``--repeats`` rounds after a warm-up). Configurations:

- ``off``: an engine without ``capture_layer`` (plain vLLM);
- ``embedded`` / ``speculative``: an engine with ``capture_layer`` by that capture method
  (``--methods``; ``engines/vllm/capture/row_store.py``, ``engines/vllm/capture/protocol.py``) and
  requests asking for their rows (the target path);
- ``embedded-unused`` / ``speculative-unused``: the same engines, requests with ``capture=False``
  (what every request pays: the row store's write, or the extra "draft" token per step, without
  the copy and the file).

The speculative method rides on vLLM's speculative slot with the last sampled token as the
"draft", so a model that repeats a token gets that next token for free: ``repeat_rate`` says how
often that happened (random models repeat a lot; real ones rarely).

Usage: ``python bench/capture_overhead.py [--requests 8] [--max-tokens 128] [--repeats 5] [--eager auto|on|off]
[--model DIR --dtype bfloat16] [-v]``; prints one JSON object (start seconds, tokens/s per
configuration) and a short table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


async def run_batch(engine, prompts, max_tokens: int, capture: bool, tag: str) -> tuple[int, float, int, int]:
    from nla_serve.types import Prompt, SamplingOptions

    options = SamplingOptions(max_tokens=max_tokens, ignore_eos=True)

    async def one(i, ids):
        tokens: list[int] = []
        rows = 0
        async for out in engine.generate(Prompt(ids), options, f"{tag}-{i}", capture=capture):
            tokens += out.token_ids
            if out.captured is not None:
                rows += out.captured.rows.shape[0]
        repeats = sum(a == b for a, b in zip(tokens, tokens[1:]))
        return len(tokens), rows, repeats

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - t0
    return sum(r[0] for r in results), wall, sum(r[1] for r in results), sum(r[2] for r in results)


async def start_engine(model: str, layer: int | None, args, method: str = "auto"):
    from nla_serve.config import EngineSettings
    from nla_serve.engines.vllm import VLLMEngine

    engine = VLLMEngine(EngineSettings(
        model=model, dtype=args.dtype, capture_layer=layer, capture_method=method, max_model_len=1024,
        max_num_seqs=max(8, args.requests),
        kv_cache_gib=0.5, enforce_eager={"auto": None, "on": True, "off": False}[args.eager],
    ))
    t0 = time.perf_counter()
    await engine.start()
    return engine, round(time.perf_counter() - t0, 1)


async def measure(configs: list[tuple[str, object, bool]], args) -> dict:
    """Every configuration (name, its engine, capture?) takes its turn, round after round (in an
    order rotated by one each round), all engines started beforehand, so slow spells of the
    machine hit them alike (configurations run one after another each in its own engine differed
    by +-15% on this machine); the first round warms up; each reports the median of the others,
    and its best."""
    import torch

    g = torch.Generator().manual_seed(0)
    rounds: dict[str, list] = {name: [] for name, _, _ in configs}
    for rep in range(args.repeats + 1):
        prompts = [[0] + torch.randint(10, 500, (args.prompt_len + 7 * i,), generator=g).tolist()
                   for i in range(args.requests)]
        shift = rep % len(configs)  # each round starts with another configuration: no place in the order is favoured
        for name, engine, capture in configs[shift:] + configs[:shift]:
            tokens, wall, rows, repeats = await run_batch(engine, prompts, args.max_tokens, capture, f"{name}{rep}")
            if args.verbose:
                print(f"round {rep} {name:>18}: {tokens / wall:8.1f} tok/s", flush=True)
            if rep:
                rounds[name].append({"tokens": tokens, "wall_s": round(wall, 3),
                                     "tokens_per_s": round(tokens / wall, 1),
                                     "rows": rows, "repeat_rate": round(repeats / tokens, 3)})
    return {name: {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rs), 1),
                   "best_tokens_per_s": max(r["tokens_per_s"] for r in rs), "rounds": rs}
            for name, rs in rounds.items()}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per configuration (after one warm-up)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--eager", choices=["auto", "on", "off"], default="auto",
                   help="vLLM eager mode; auto = the engine default (eager on CPU, compiled on GPU)")
    p.add_argument("--model", help="a model folder instead of the random Llama")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--methods", default="embedded,speculative", help="capture methods to measure, comma-separated")
    p.add_argument("-v", "--verbose", action="store_true", help="print every round")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    methods = [m for m in args.methods.split(",") if m]

    from transformers import AutoConfig

    from nla_serve.tiny import build_target

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model, layers = args.model, AutoConfig.from_pretrained(args.model).num_hidden_layers
            desc = f"{args.model}, {args.dtype}"
        else:
            model, layers = str(build_target(os.path.join(tmp, "target"), layers=args.layers, hidden=args.hidden)), args.layers
            desc = f"random Llama, {args.layers} blocks, hidden {args.hidden}, {args.dtype}"
        layer = layers // 2
        engines, starts, configs = [], {}, []
        try:
            for method in [None] + methods:
                engine, starts[method or "plain"] = await start_engine(
                    model, None if method is None else layer, args, method or "auto")
                engines.append(engine)
                configs += ([("off", engine, False)] if method is None else
                            [(method, engine, True), (f"{method}-unused", engine, False)])
            runs = await measure(configs, args)
        finally:
            for engine in engines:
                await engine.shutdown()
    tps = {k: v["tokens_per_s"] for k, v in runs.items()}
    result = {
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": f"{desc}, capture layer {layer}",
        "requests": args.requests, "max_tokens": args.max_tokens, "eager": args.eager, "rounds": args.repeats,
        "start_s": starts,
        "tokens_per_s": tps,
        # the share of plain vLLM's generated tokens/s that capture costs, per method
        "capture_cost": {m: round(1 - tps[m] / tps["off"], 4) for m in methods},
        # the same, round by round (each against the plain engine's run just before it), median
        "capture_cost_paired": {m: round(statistics.median(
            1 - a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[m]["rounds"], runs["off"]["rounds"])), 4)
            for m in methods},
        "detail": runs,
    }
    print(json.dumps(result, indent=2))
    base = result["tokens_per_s"]["off"]
    for k, v in result["tokens_per_s"].items():
        print(f"{k:>18}: {v:8.1f} tok/s  ({v / base:.2f}x of off)")


if __name__ == "__main__":
    asyncio.run(main())
