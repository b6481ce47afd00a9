"""The README's batch example, end to end with the official SDK: one prompt set answered by the
default model and by the same model with a LoRA adapter, as two batches, then the comparison
report (the server's own page) saved and photographed in Chromium.

    nla-serve adapter --out kjv-adapter          # a KJV-styled LoRA of the default model (~5 min)
    nla-serve serve --lora-modules kjv=kjv-adapter &
    python bench/batch_demo.py --url http://127.0.0.1:8000 --adapter kjv --out demo/

Writes ``requests.jsonl`` (per model), the two output files, ``report.html`` and ``report.png``
under ``--out``, and prints one JSON summary (lines, seconds, mean FVE per run).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import httpx
import openai

PROMPTS = [
    "What should I cook for dinner tonight?", "How do I ask my boss for a day off?",
    "Why do cats purr?", "Give me advice for my first day at a new job.", "What is the meaning of friendship?",
    "How can I stop worrying about the future?", "Describe a walk in the forest.", "What makes a good leader?",
    "How do I fix a slow computer?", "Tell me about the ocean.", "What should I do when I feel lonely?",
    "Write one sentence about the night sky.",
]


def lines(model: str, max_tokens: int) -> bytes:
    rows = [{"custom_id": f"prompt-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": max_tokens, "temperature": 0,
                      "messages": [{"role": "user", "content": p}],
                      "explain": {"positions": "auto", "max_explanations": 4, "claims": True}}}
            for i, p in enumerate(PROMPTS)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def run_batch(client: openai.OpenAI, model: str, max_tokens: int, out: Path) -> dict:
    content = lines(model, max_tokens)
    (out / f"requests-{model}.jsonl").write_bytes(content)
    f = client.files.create(file=(f"requests-{model}.jsonl", io.BytesIO(content)), purpose="batch")
    t0 = time.monotonic()
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"model": model})
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(2)
        batch = client.batches.retrieve(batch.id)
    text = client.files.content(batch.output_file_id).text
    (out / f"results-{model}.jsonl").write_text(text)
    fves = [e["fve"] for line in text.splitlines() for e in json.loads(line)["response"]["body"]["explanations"]
            if e.get("fve") is not None]
    return {"batch": batch.id, "model": model, "lines": batch.request_counts.completed,
            "failed": batch.request_counts.failed, "seconds": round(time.monotonic() - t0, 1),
            "explanations": len(fves), "mean_fve": round(statistics.mean(fves), 3) if fves else None}


def photograph(html: Path, png: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(html.resolve().as_uri())
        page.screenshot(path=str(png), full_page=True)
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--adapter", default="kjv")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--out", default="batch-demo")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    client = openai.OpenAI(base_url=args.url + "/v1", api_key=args.api_key, timeout=600)
    runs = [run_batch(client, m, args.max_tokens, out) for m in (args.model, args.adapter)]
    page = httpx.get(f"{args.url}/v1/batches/{runs[0]['batch']}/report", params={"against": runs[1]["batch"]},
                     headers={"Authorization": f"Bearer {args.api_key}"}, timeout=120).raise_for_status()
    (out / "report.html").write_text(page.text)
    photograph(out / "report.html", out / "report.png")
    print(json.dumps({"runs": runs, "report": str(out / "report.html")}))


if __name__ == "__main__":
    main()
