"""`make bench` is not timed in tests, but it must run: a short bench on the tiny model, end to end,
producing every number the benchmark docs report (it once broke silently behind a refactor)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]


def test_the_bench_runs_and_reports_every_number(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "nla_serve.bench", "--models", "tiny", "--requests", "2",
                          "--max-tokens", "8", "--concurrency", "1", "--per-request", "2", "--load-streams", "2",
                          "--load-seconds", "8", "--load-probes", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=1100)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [tiny] = json.loads(out.read_text())["runs"]
    assert tiny["capture_off"]["tokens_per_s"] > 0 and tiny["capture_on_nothing_explained"]["tokens_per_s"] > 0
    assert tiny["default_policy"]["explanations"] > 0
    assert tiny["default_policy"]["token_to_explanation_p50"] is not None
    wr = tiny["worker_vs_raw"]
    assert wr["jobs"] == 16 and wr["raw_tokens_per_s"] > 0 and wr["worker_tokens_per_s"] > 0
    assert {r["mode"] for r in tiny["explanations"]} == {"batched", "one_at_a_time"}
    load = tiny["load"]
    assert load["explained_requests"] > 0 and load["explanations_per_s"] > 0 and load["mean_fve"] is not None
    assert load["plain_alone"]["ttft_p50_s"] and load["plain_under_load"]["requests"] >= 0
    assert set(load["plain_ratio_under_load"]) == {"ttft_p50_s", "itl_p50_s", "e2e_p50_s"}
