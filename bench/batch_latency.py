"""An interactive request's latency while a batch runs, against the same request alone.

    python bench/batch_latency.py --model tiny|default [--engine vllm|transformers] [--lines 48]
        [--repeats 5] [--max-tokens 32] [--out bench-results/batch-latency.json]

1. Starts `nla-serve serve` on the tiny models (built now) or on the embedded default model with
   the shipped NLA.
2. Alone: the same streamed, explained chat request (the server's default explanation policy),
   ``--repeats`` times one after another: time to first token and end-to-end.
3. Beside a batch: uploads ``--lines`` explained chat requests as a batch file (the Batch API, as
   the SDK sends it), and once the batch is running sends the same interactive request again, one
   after another, while the batch is still running (up to ``--repeats``); each is counted only if
   the batch was running from its start to its end.
4. Waits for the batch to end: lines, seconds, lines/s.

Prints and writes one JSON object: the p50s alone and beside the batch and their ratios. The
batch runner admits one line at a time while an interactive request is in flight (else
``--batch-concurrency``), so the ratio is what that rule buys.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import launch, tiny_flags  # noqa: E402

# each interactive request is a new question of the same length: a repeated one would be answered
# from the explanation cache and measure nothing
QUESTIONS = ["why the sky is blue", "why bread rises", "why ice floats", "why leaves fall", "why rivers bend",
             "why owls hoot", "why salt melts ice", "why tea cools", "why bees dance", "why glass is clear",
             "why the moon glows", "why trains whistle"]
TOPICS = ["rivers", "bread", "volcanoes", "chess", "bees", "trains", "the moon", "paper", "salt", "glass", "owls",
          "tea"]


def interactive(client: httpx.Client, url: str, model: str, max_tokens: int, i: int) -> dict:
    question = f"Explain in two sentences {QUESTIONS[i % len(QUESTIONS)]} (case {i})."
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": question}]}
    t0 = time.monotonic()
    ttft, explained, ok = None, 0, False
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            if line == "data: [DONE]":
                ok = r.status_code == 200
                break
            if ttft is None and '"delta"' in line:
                ttft = time.monotonic() - t0
            explained += line.count('"token_index"')
    return {"ok": ok, "ttft_s": round(ttft, 4) if ttft is not None else None,
            "e2e_s": round(time.monotonic() - t0, 4), "explanations": explained}


def batch_file(model: str, lines: int, max_tokens: int) -> bytes:
    rows = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": max_tokens, "temperature": 0,
                      "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]} ({i})."}]}}
            for i in range(lines)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def batch_state(client: httpx.Client, url: str, batch_id: str) -> dict:
    return client.get(f"{url}/v1/batches/{batch_id}").raise_for_status().json()


def p50(runs: list[dict], key: str) -> float | None:
    xs = [r[key] for r in runs if r[key] is not None]
    return round(statistics.median(xs), 4) if xs else None


def measure(url: str, model: str, args: argparse.Namespace) -> dict:
    client = httpx.Client(timeout=600)
    interactive(client, url, model, args.max_tokens, 0)  # warm-up: first-request costs are not the batch's
    alone = [interactive(client, url, model, args.max_tokens, 1 + i) for i in range(args.repeats)]
    up = client.post(url + "/v1/files", data={"purpose": "batch"},
                     files={"file": ("lines.jsonl", batch_file(model, args.lines, args.max_tokens))}).raise_for_status()
    batch = client.post(url + "/v1/batches", json={"input_file_id": up.json()["id"], "endpoint": "/v1/chat/completions",
                                                  "completion_window": "24h"}).raise_for_status().json()
    t_batch = time.monotonic()
    while batch_state(client, url, batch["id"])["status"] == "validating":
        time.sleep(0.05)
    beside, outside = [], 0
    while len(beside) < args.repeats:
        run = interactive(client, url, model, args.max_tokens, 1 + args.repeats + len(beside))
        doc = batch_state(client, url, batch["id"])
        if doc["status"] != "in_progress":
            outside += 1  # the batch ended during this request: not counted
            break
        beside.append(run)
    while (doc := batch_state(client, url, batch["id"]))["status"] not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.2)
    seconds = time.monotonic() - t_batch
    counts = doc["request_counts"]
    ratio = {k: (round(p50(beside, k) / p50(alone, k), 3) if p50(beside, k) and p50(alone, k) else None)
             for k in ("ttft_s", "e2e_s")}
    return {"model": model, "max_tokens": args.max_tokens, "repeats": args.repeats,
            "alone": {"ttft_p50_s": p50(alone, "ttft_s"), "e2e_p50_s": p50(alone, "e2e_s"), "runs": alone},
            "beside_batch": {"ttft_p50_s": p50(beside, "ttft_s"), "e2e_p50_s": p50(beside, "e2e_s"), "runs": beside,
                             "not_counted_batch_ended": outside},
            "ratio_beside_over_alone": ratio,
            "batch": {"id": doc["id"], "status": doc["status"], "lines": counts["total"],
                      "completed": counts["completed"], "failed": counts["failed"], "seconds": round(seconds, 2),
                      "lines_per_s": round(counts["completed"] / seconds, 3)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "default"], default="tiny")
    ap.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    ap.add_argument("--lines", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="bench-results/batch-latency.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nla-batch-bench-") as tmp:
        root = Path(tmp)
        # the default model and NLA come from the usual cache; the batch state is always fresh
        flags = tiny_flags(root) if args.model == "tiny" else []
        flags += ["--engine", args.engine, "--kv-cache-gib", "1", "--batch-db", str(root / "batch.db")]
        proc, url = launch(flags, root / "serve.log")
        try:
            result = measure(url, "tiny" if args.model == "tiny" else "SmolLM2-135M-Instruct", args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    result["engine"] = args.engine
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("alone", "beside_batch")} |
                     {"alone_p50": {k: result["alone"][k] for k in ("ttft_p50_s", "e2e_p50_s")},
                      "beside_p50": {k: result["beside_batch"][k] for k in ("ttft_p50_s", "e2e_p50_s")}}))


if __name__ == "__main__":
    main()
