"""GPU smoke test of the capture path: what the CPU machines cannot check. Not run by `make test`.

On a CUDA machine with the CUDA `vllm` installed (`make install` picks it when `nvidia-smi` works):

    .venv/bin/python bench/gpu_smoke.py --out gpu-smoke.json   # capture checks under 5 min, then ~2 min per load run

For each runner configuration (the V1 model runner and Model Runner V2, via VLLM_USE_V2_MODEL_RUNNER;
eager, PIECEWISE and FULL CUDA graphs; async scheduling where vLLM enables it) and each capture
method (`embedded`: the draft-free row store, `speculative`: the extract_hidden_states drafter) it
starts the capturing engine on a random bf16 Llama (or --model), generates greedily, and checks that:

- rows arrived while the request ran (in several pieces, not all at the end) and add up to
  P+G-1 rows: none at or past the last sampled token;
- they match a plain transformers bf16 forward of the same tokens (max abs error reported, bound
  --atol, relative to the rows' scale);
- and reports whether the tokens match transformers' greedy tokens (informational: bf16 kernels
  differ, and a random model's near-tied logits flip; the rows are compared on vLLM's own tokens);
- steering (embedded method): strength 0 bit-identical to unsteered, a strong vector changes the
  tokens but not the prompt's rows, a steered and a plain request together equal each alone.

Then tokens/s of plain vLLM against each capture method at 1, 8 and 64 concurrent streams
(bench/capture_overhead.py's measurement), and `make bench`'s load section on the embedded default
model with its shipped NLA (`--load-seconds`, 0 to skip): explained streams at 8 and 32, their
explanations/s and verbaliser tokens/s, token-to-explanation p50/p95, FVE per verbaliser token, and
plain streams' TTFT and ITL alone against under that load. Every configuration runs in its own subprocess (a vLLM
engine per process), so one that fails is reported with its error and the rest still run. The
output is one JSON object. What it does not check: hidden device syncs inside the engine processes
(`torch.cuda.set_sync_debug_mode` would have to run there; the connector's per-step copy is a
synchronous `.to("cpu")` today, see docs/design.md) and TP > 1.

Run on CPU (`--cpu`) it exercises the same code with the eager V1 runner only: a check of the
script itself, not of the GPU paths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CONFIGS = {  # name -> (environment, compilation config, enforce_eager)
    "v1-eager": ({"VLLM_USE_V2_MODEL_RUNNER": "0"}, None, True),
    "v1-piecewise": ({"VLLM_USE_V2_MODEL_RUNNER": "0"}, {"cudagraph_mode": "PIECEWISE"}, False),
    "v1-full": ({"VLLM_USE_V2_MODEL_RUNNER": "0"}, {"cudagraph_mode": "FULL"}, False),
    "v2-eager": ({"VLLM_USE_V2_MODEL_RUNNER": "1"}, None, True),
    "v2-full-and-piecewise": ({"VLLM_USE_V2_MODEL_RUNNER": "1"}, {"cudagraph_mode": "FULL_AND_PIECEWISE"}, False),
}


# the speculative method is the fallback: checked on the GPU default configuration only, to stay
# within five minutes; the draft-free row store (the default) on every configuration
FALLBACK_CONFIGS = ("v1-full",)


async def parity(model: str, layer: int, compilation: dict | None, eager: bool, atol: float,
                 method: str = "embedded") -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from nla_serve.config import EngineSettings
    from nla_serve.engines.vllm import VLLMEngine
    from nla_serve.types import Prompt, SamplingOptions

    kw = {"compilation_config": compilation} if compilation else {}
    engine = VLLMEngine(EngineSettings(model=model, dtype="bfloat16", capture_layer=layer, capture_method=method,
                                       max_model_len=1024, max_num_seqs=64, enforce_eager=eager, kv_cache_gib=0.5,
                                       **kw))
    t0 = time.perf_counter()
    await engine.start()
    out: dict = {"start_s": round(time.perf_counter() - t0, 1)}
    try:
        prompt = [0] + list(range(10, 200))
        pieces, tokens = [], []
        async for step in engine.generate(Prompt(prompt), SamplingOptions(max_tokens=48, ignore_eos=True), "smoke"):
            tokens += step.token_ids
            if step.captured is not None:
                pieces.append((step.captured.start, step.captured.rows, step.finished))
        rows = torch.cat([r for _, r, _ in pieces])
        fed = prompt + tokens[:-1]
        out["pieces"] = len(pieces)
        out["pieces_before_finish"] = sum(not f for _, _, f in pieces)
        out["rows"], out["expected_rows"] = int(rows.shape[0]), len(fed)
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval() if torch.cuda.is_available() \
            else AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
        dev = next(hf.parameters()).device
        with torch.no_grad():
            ref = hf(torch.tensor([fed], device=dev), output_hidden_states=True).hidden_states[layer + 1][0].float().cpu()
            greedy = hf.generate(torch.tensor([prompt], device=dev), max_new_tokens=48, do_sample=False,
                                 min_new_tokens=48)[0, len(prompt):].tolist()
        err = (rows - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        out["max_rel_error"] = round(err, 5)
        out["tokens_match_transformers"] = tokens == greedy
        out["ok"] = (rows.shape[0] == len(fed) and out["pieces_before_finish"] > 0 and err <= atol)
        if method == "embedded":
            out["steering"] = await steering_checks(engine, prompt, tokens, rows)
            out["ok"] = out["ok"] and out["steering"]["ok"]
    finally:
        await engine.shutdown()
    return out


async def steering_checks(engine, prompt: list[int], plain_tokens: list[int], plain_rows) -> dict:
    """Steering under this runner configuration (CUDA graphs included): strength 0 gives the
    unsteered tokens and rows exactly; a strong vector changes the tokens but not the prompt's rows
    (read before the addition); a steered and a plain request run together each equal their run alone."""
    import torch

    from nla_serve.steering.intervention import Intervention, PositionRule
    from nla_serve.types import Prompt, SamplingOptions

    layer = engine.settings.capture_layer
    v = torch.randn(engine.hidden_size, generator=torch.Generator().manual_seed(0))
    unit = tuple((v / v.norm()).tolist())

    def iv(strength: float) -> Intervention:
        return Intervention(layer, (unit,), (strength,), (PositionRule("all"),), len(prompt), max_ratio=8.0)

    async def run(intervention, rid):
        toks, rows = [], []
        async for step in engine.generate(Prompt(prompt), SamplingOptions(max_tokens=48, ignore_eos=True), rid,
                                          intervention=intervention):
            toks += step.token_ids
            if step.captured is not None:
                rows.append(step.captured.rows)
        return toks, torch.cat(rows)

    zero_tokens, zero_rows = await run(iv(0.0), "steer-zero")
    strong_tokens, strong_rows = await run(iv(4.0), "steer-strong")
    both = await asyncio.gather(run(iv(4.0), "steer-mixed"), run(None, "plain-mixed"))
    P = len(prompt)
    out = {"zero_identical": zero_tokens == plain_tokens and bool(torch.equal(zero_rows, plain_rows)),
           "strong_changes_tokens": strong_tokens != plain_tokens,
           "prompt_rows_unchanged_max_abs": round(float((strong_rows[:P] - plain_rows[:P]).abs().max()), 6),
           "concurrent_equal_alone": both[0][0] == strong_tokens and both[1][0] == plain_tokens}
    out["ok"] = (out["zero_identical"] and out["strong_changes_tokens"] and out["concurrent_equal_alone"]
                 and out["prompt_rows_unchanged_max_abs"] == 0.0)
    return out


def one_config(name: str, model: str, layer: int, atol: float, method: str) -> dict:
    env, compilation, eager = CONFIGS[name]
    code = (f"import asyncio, json, sys; sys.path.insert(0, {str(HERE)!r}); import gpu_smoke; "
            f"print('RESULT ' + json.dumps(asyncio.run(gpu_smoke.parity({model!r}, {layer}, {compilation!r}, "
            f"{eager!r}, {atol!r}, {method!r}))))")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                         timeout=240)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"ok": False, "error": (res.stderr or res.stdout)[-1500:], "wall_s": round(time.perf_counter() - t0, 1)}
    return json.loads(line[7:]) | {"wall_s": round(time.perf_counter() - t0, 1)}


def throughput(model: str, streams: list[int], max_tokens: int, methods: list[str]) -> dict:
    """bench/capture_overhead.py at each concurrency: plain vLLM vs each capture method."""
    out = {}
    for n in streams:
        res = subprocess.run([sys.executable, str(HERE / "capture_overhead.py"), "--model", model, "--dtype",
                              "bfloat16", "--requests", str(n), "--max-tokens", str(max_tokens), "--repeats", "1",
                              "--methods", ",".join(methods)],
                             capture_output=True, text=True, timeout=300)
        try:
            text = res.stdout  # the JSON object starts on a line of its own (vLLM may print before it)
            start = 0 if text.startswith("{") else text.index("\n{") + 1
            doc = json.loads(text[start:text.rindex("}") + 1])
            out[str(n)] = doc["tokens_per_s"] | {"capture_cost": doc["capture_cost"]}
        except (ValueError, KeyError):
            out[str(n)] = {"error": (res.stderr or res.stdout)[-800:]}
    return out


def load(streams: list[int], seconds: float) -> dict:
    """`python -m nla_serve.bench`'s load section (nla_serve/bench_load.py) at each stream count."""
    out = {}
    for n in streams:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            res = subprocess.run([sys.executable, "-m", "nla_serve.bench", "--models", "default", "--skip-scaling",
                                  "--load-streams", str(n), "--load-seconds", str(seconds), "--out", f.name],
                                 capture_output=True, text=True, timeout=seconds + 600)
            try:
                out[str(n)] = json.loads(Path(f.name).read_text())["runs"][0]["load"]
            except (ValueError, KeyError, IndexError):
                out[str(n)] = {"error": (res.stderr or res.stdout)[-800:]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model folder (default: a random bf16 Llama, 8 blocks, hidden 1024)")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--streams", default="1,8,64")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--atol", type=float, default=0.06,
                   help="max |vLLM - transformers| / max |row| in bf16 (0.039 seen on CPU, random 8-block model)")
    p.add_argument("--methods", default="embedded,speculative", help="capture methods, comma-separated")
    p.add_argument("--cpu", action="store_true", help="check the script on CPU (eager V1 only, 1 and 8 streams)")
    p.add_argument("--load-seconds", type=float, default=60.0,
                   help="seconds of explained load per stream count on the default model (0: skip; --cpu: 0 unless given)")
    p.add_argument("--load-streams", default="8,32")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.cpu and "--load-seconds" not in sys.argv:
        args.load_seconds = 0.0
    t0 = time.perf_counter()
    configs = ["v1-eager"] if args.cpu else args.configs.split(",")
    streams = [1, 8] if args.cpu else [int(s) for s in args.streams.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from transformers import AutoConfig

            model, layer = args.model, AutoConfig.from_pretrained(args.model).num_hidden_layers // 2
        else:
            from nla_serve.tiny import build_target

            model = str(build_target(os.path.join(tmp, "target"), layers=8, hidden=256 if args.cpu else 1024))
            layer = 4
        result = {"device": "cpu" if args.cpu else "cuda", "model": args.model or "random Llama",
                  "configs": {f"{name}/{m}": one_config(name, model, layer, args.atol, m)
                              for name in configs for m in methods
                              if m == "embedded" or name in FALLBACK_CONFIGS or args.cpu},
                  "tokens_per_s": throughput(model, streams, args.max_tokens, methods)}
    if args.load_seconds > 0:
        result["load"] = load([int(n) for n in args.load_streams.split(",")], args.load_seconds)
    result["ok"] = all(c.get("ok") for c in result["configs"].values())
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
