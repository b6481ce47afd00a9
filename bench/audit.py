"""What the audit log costs, measured (part of `make bench`); prints one JSON and writes it to --out.

1. Tokens/s with the audit on vs off, in one run: two real `nla-serve serve` processes on the
   same model, one with `--audit off`, driven alternately (on, off, on, off, ...) by the same
   concurrent streaming clients over HTTP, so that drift on a shared machine hits both alike.
   Every request is a plain completion with explanations off: the case where the record's cost is
   largest relative to the work, since an explained request spends far longer in the verbalizer.
2. Search latency over a large log: a SQLite log filled through the real writer (signed records,
   tree, FTS5 index) with --records records of four explanations each (100,000 explanation rows
   by default), from a vocabulary drawn from Python's own documentation; then p50/p95 of a mix of
   queries (one word, two words, a phrase, CJK, with and without filters). With --postgres DSN the
   same on PostgreSQL.

    python bench/audit.py --model tiny --out bench-results/audit.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import launch, tiny_flags  # noqa: E402


# -- 1. tokens/s, audit on vs off ---------------------------------------------------------------

def model_flags(name: str, root: Path) -> tuple[list[str], str]:
    if name == "tiny":
        return tiny_flags(root), "tiny"
    return ["--cache-dir", str(Path(os.environ.get("NLA_SERVE_CACHE_DIR", Path.home() / ".cache/nla-serve")))], \
        "SmolLM2-135M-Instruct"


async def one_round(url: str, model: str, streams: int, max_tokens: int) -> tuple[int, float]:
    """``streams`` concurrent streamed completions to the end ([DONE]); (tokens, seconds)."""
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int) -> int:
            body = {"model": model, "prompt": f"Item {i}: a short story about the sea.", "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "explain": False,
                    "stream_options": {"include_usage": True}}
            tokens = 0
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"usage"' in line:
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            tokens = usage["completion_tokens"]
            return tokens

        t0 = time.perf_counter()
        counts = await asyncio.gather(*[one(i) for i in range(streams)])
        return sum(counts), time.perf_counter() - t0


def throughput(args, root: Path) -> dict:
    flags, model = model_flags(args.model, root)
    procs = {}
    try:
        for mode, extra in (("on", ["--audit-db", str(root / "audit.db")]), ("off", ["--audit", "off"])):
            procs[mode] = launch(flags + ["--explain-default", "off"] + extra, root / f"serve-{mode}.log")
        runs: dict[str, list[float]] = {"on": [], "off": []}
        counts: dict[str, set[int]] = {"on": set(), "off": set()}
        for _ in range(args.warmup):
            for mode in ("on", "off"):
                asyncio.run(one_round(procs[mode][1], model, args.streams, args.max_tokens))
        for i in range(args.rounds):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for mode in order:
                tokens, seconds = asyncio.run(one_round(procs[mode][1], model, args.streams, args.max_tokens))
                counts[mode].add(tokens)  # greedy, same prompts: both servers must produce the same tokens
                runs[mode].append(tokens / seconds)
        if counts["on"] != counts["off"] or len(counts["on"]) != 1:
            raise SystemExit(f"the two servers generated different token counts: {counts}")
        on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
        return {"model": args.model, "streams": args.streams, "max_tokens": args.max_tokens, "rounds": args.rounds,
                "tokens_per_s_audit_on": on, "tokens_per_s_audit_off": off, "audit_cost": 1 - on / off,
                "runs": runs}
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(60)


# -- 2. search latency ----------------------------------------------------------------------------

def vocabulary() -> list[str]:
    import pydoc_data.topics as topics

    words = {w.strip(".,:;()[]\"'`").lower() for text in topics.topics.values() for w in text.split()}
    return sorted(w for w in words if w.isalpha() and 3 <= len(w) <= 12)


def fake_record(i: int, rng: random.Random, words: list[str]) -> dict:
    def sentence(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    monitors = ["tested"] if i % 50 == 0 else []
    expl = [{"choice_index": 0, "token_index": 30 + k, "source": "completion" if k else "prompt", "status": "ok",
             "text": f"An assistant's reply about {sentence(3)}. The last words read \"{sentence(4)}\". "
                     f"{'用户问天气。' if i % 97 == 0 else ''}Next it expects \"{rng.choice(words)}\".",
             "fve": round(rng.uniform(-0.5, 0.9), 3), "grounding": {"score": rng.choice([0.0, 0.5, 1.0])},
             "monitors": monitors, "activation_sha256": f"{i:064x}"} for k in range(4)]
    return {"v": 1, "id": f"chatcmpl-{i:08d}", "kind": "chat", "status": "completed", "model": "bench",
            "key_id": ("alice", "bob", "carol")[i % 3], "params": {"max_tokens": 64},
            "prompt": {"messages": [{"role": "user", "content": sentence(8)}]},
            "choices": [{"index": 0, "text": sentence(40), "token_ids": list(range(40)), "finish_reason": "stop"}],
            "explanations": expl}


def fill_log(where: str, key_path: Path, records: int) -> float:
    from nla_serve.audit.log import AuditLog
    from nla_serve.audit.note import LogKey
    from nla_serve.audit.store import open_store

    rng = random.Random(0)
    words = vocabulary()
    log = AuditLog(open_store(where), LogKey.load_or_create(key_path), queue_size=8192, max_batch=512).open()

    async def go():
        batch = 2000
        for start in range(0, records, batch):
            await asyncio.gather(*[log.append(fake_record(i, rng, words)) for i in range(start,
                                                                                     min(records, start + batch))])
        await log.checkpoint_now()

    t0 = time.perf_counter()
    asyncio.run(go())
    log.close()
    return time.perf_counter() - t0


def queries(words: list[str], rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            out.append({"q": rng.choice(words)})
        elif kind == 1:
            out.append({"q": f"{rng.choice(words)} {rng.choice(words)}"})
        elif kind == 2:
            out.append({"q": rng.choice(words), "fve_min": 0.5, "key_id": "alice"})
        elif kind == 3:
            out.append({"q": "天气"})
        elif kind == 4:
            out.append({"monitor": "tested", "source": "completion"})
        else:
            out.append({"q": f'"last words read" {rng.choice(words)}', "since": "2000-01-01", "grounding_min": 0.5})
    return out


def search_latency(where: str, n_queries: int) -> dict:
    from nla_serve.audit.store import SearchQuery, find_hits, open_store

    store = open_store(where)
    rng = random.Random(1)
    qs = queries(vocabulary(), rng, n_queries)
    for q in qs[:20]:  # warm the page cache
        find_hits(store, SearchQuery(**q))
    times, hits = [], []
    for q in qs:
        t0 = time.perf_counter()
        found = find_hits(store, SearchQuery(**q))
        times.append(1000 * (time.perf_counter() - t0))
        hits.append(len(found))
    texts = int(store.rows("SELECT COUNT(*) FROM texts")[0][0])
    store.close()
    times.sort()
    return {"queries": len(times), "text_rows": texts, "p50_ms": times[len(times) // 2],
            "p95_ms": times[int(0.95 * (len(times) - 1))], "max_ms": times[-1],
            "mean_hits": statistics.mean(hits)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "default"])
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=24, help="measured rounds per mode (alternating); fewer "
                   "than ~20 measures the machine's noise (+-15% per round here), not the audit")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--records", type=int, default=25_000, help="records of 4 explanations each for search")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--postgres", default=None, help="a postgresql:// DSN to measure search on too")
    p.add_argument("--skip", default="", help="comma list of: throughput, search")
    p.add_argument("--out", default="bench-results/audit.json")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "throughput" not in skip:
            result["throughput"] = throughput(args, root)
            print(json.dumps(result["throughput"]), flush=True)
        if "search" not in skip:
            db = str(root / "search.db")
            result["search_sqlite"] = {"fill_seconds": fill_log(db, root / "k", args.records)} | \
                search_latency(db, args.queries)
            print(json.dumps(result["search_sqlite"]), flush=True)
            if args.postgres:
                result["search_postgresql"] = {"fill_seconds": fill_log(args.postgres, root / "k", args.records)} | \
                    search_latency(args.postgres, args.queries)
                print(json.dumps(result["search_postgresql"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "args"}))


if __name__ == "__main__":
    main()
