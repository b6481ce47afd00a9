"""`make soak`: a bounded load-and-fault run of the real server, printed as one JSON line.

    python bench/soak.py --model tiny|default [--minutes M] [--streams 64] [--max-tokens 64]

1. Starts `nla-serve serve` (vLLM engines) on the tiny models (built at start) or on the embedded
   default model with the shipped NLA.
2. Load: ``--streams`` concurrent streamed chats with the server's default explanation policy, each
   followed at once by the next, for ``--minutes``; counts failures, TTFT and end-to-end p50/p95,
   and samples the RSS of the server and every engine process and the bytes in /dev/shm every 5 s.
3. Faults: with a quarter of the streams still running, ``kill -9`` one engine-core process, then
   the other, and times how long until /health is "ok" again; requests failing inside a fault window
   are counted apart from the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serving import launch, tiny_flags


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError):
                pass
    return out


def engine_cores(pid: int) -> list[int]:
    return sorted(p for p in children(pid) if b"EngineCore" in _cmdline(p))


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def shm_bytes() -> int:
    total = 0
    for d in Path("/dev/shm").glob("nla-serve-*"):
        for f in d.glob("*"):
            try:
                total += f.stat().st_size
            except OSError:
                pass
    return total


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def start(model: str, root: Path) -> tuple[subprocess.Popen, str, str, Path]:
    """The tiny models, or the embedded default model with the shipped NLA (in the usual cache)."""
    log = root / "serve.log"
    flags = tiny_flags(root) if model == "tiny" else []
    proc, url = launch(flags + ["--kv-cache-gib", "1"], log)
    return proc, url, "tiny" if model == "tiny" else "SmolLM2-135M-Instruct", log


class Load:
    def __init__(self, url: str, model: str, max_tokens: int):
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.results: list[dict] = []  # one per request
        self.fault_windows: list[tuple[float, float]] = []
        self.stop = False

    async def one(self, client: httpx.AsyncClient, i: int) -> None:
        body = {"model": self.model, "stream": True, "max_tokens": self.max_tokens, "temperature": 0.7,
                "messages": [{"role": "user", "content": f"Tell me something about topic number {i}."}]}
        t0 = time.monotonic()
        ttft = None
        ok = False
        status = None
        explained = 0
        try:
            async with client.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
                status = r.status_code
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    if line == "data: [DONE]":
                        ok = status == 200
                        break
                    if '"error"' in line and '"choices"' not in line:
                        status = json.loads(line[5:])["error"]["code"]
                        continue
                    if ttft is None and '"delta"' in line:
                        ttft = time.monotonic() - t0
                    explained += line.count('"token_index"')
        except httpx.HTTPError as e:
            status = type(e).__name__
        t1 = time.monotonic()
        self.results.append({"start": t0, "end": t1, "ok": ok and status == 200, "status": status, "ttft": ttft,
                             "e2e": t1 - t0, "explanations": explained})

    async def worker(self, client: httpx.AsyncClient, k: int, until: float) -> None:
        i = 0
        while time.monotonic() < until and not self.stop:
            await self.one(client, k * 100_000 + i)
            if not self.results[-1]["ok"]:
                await asyncio.sleep(1.0)  # as a client would: back off after a 503
            i += 1

    def in_fault(self, r: dict) -> bool:
        return any(r["start"] < b and r["end"] > a for a, b in self.fault_windows)


async def soak(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="nla-soak-"))
    proc, url, name, log = start(args.model, root)
    load = Load(url, name, args.max_tokens)
    samples = []

    async def sample(until: float) -> None:
        while time.monotonic() < until:
            pids = [proc.pid] + children(proc.pid)
            samples.append({"t": round(time.monotonic() - t_start, 1),
                            "rss_mib": {str(p): round(rss_mib(p), 1) for p in pids},
                            "rss_total_mib": round(sum(rss_mib(p) for p in pids), 1), "shm_bytes": shm_bytes()})
            await asyncio.sleep(5)

    t_start = time.monotonic()
    load_until = t_start + args.minutes * 60
    limits = httpx.Limits(max_connections=args.streams + 8)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        sampler = asyncio.create_task(sample(load_until))
        await asyncio.gather(*(load.worker(client, k, load_until) for k in range(args.streams)))
        await sampler
        load_results = list(load.results)
        # faults, under a lighter load
        faults = []
        fault_until = time.monotonic() + 600
        background = [asyncio.create_task(load.worker(client, 10 + k, fault_until)) for k in range(args.streams // 4)]
        await asyncio.sleep(5)
        killed: set[int] = set()
        for _ in range(2):
            pids = [p for p in engine_cores(proc.pid) if p not in killed]
            victim = pids[0]
            killed.add(victim)
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            which, recovered = None, None
            while time.monotonic() - t0 < 300:
                try:
                    r = httpx.get(url + "/health", timeout=2)
                    h = r.json()
                    if which is None and h.get("status") != "ok":
                        which = "target" if h.get("target") != "up" else "verbalizer"
                    if which is not None and h.get("status") == "ok":
                        recovered = round(time.monotonic() - t0, 1)
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
            load.fault_windows.append((t0, time.monotonic() + 1))
            faults.append({"engine": which, "recovery_s": recovered})
            await asyncio.sleep(5)
        load.stop = True
        await asyncio.gather(*background)
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()

    def summary(rs: list[dict]) -> dict:
        done = [r for r in rs if r["ok"]]
        return {"requests": len(rs), "failed": len(rs) - len(done),
                "failed_statuses": sorted({str(r["status"]) for r in rs if not r["ok"]}),
                "ttft_p50_s": pct([r["ttft"] for r in done if r["ttft"] is not None], 0.5),
                "ttft_p95_s": pct([r["ttft"] for r in done if r["ttft"] is not None], 0.95),
                "e2e_p50_s": pct([r["e2e"] for r in done], 0.5), "e2e_p95_s": pct([r["e2e"] for r in done], 0.95),
                "explanations_per_request": round(statistics.mean([r["explanations"] for r in done]), 2) if done else None}

    after = load.results[len(load_results):]
    warm = [s for s in samples if s["t"] >= 30] or samples
    return {"model": args.model, "streams": args.streams, "max_tokens": args.max_tokens, "minutes": args.minutes,
            "load": summary(load_results),
            "fault_phase": {"outside_fault_windows": summary([r for r in after if not load.in_fault(r)]),
                            "inside_fault_windows": summary([r for r in after if load.in_fault(r)]), "faults": faults},
            "rss_total_mib": {"first_after_warmup": warm[0]["rss_total_mib"] if warm else None,
                              "last": samples[-1]["rss_total_mib"] if samples else None,
                              "max": max((s["rss_total_mib"] for s in samples), default=None)},
            "shm_bytes_max": max((s["shm_bytes"] for s in samples), default=0),
            "samples": samples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "default"])
    ap.add_argument("--minutes", type=float, default=3)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    result = asyncio.run(soak(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
