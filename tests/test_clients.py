"""The current releases of eight popular OpenAI client libraries, run unchanged against one real
`nla-serve` on the tiny models (vLLM engine, hermes tool parser, --disable-any-whitespace): each
library's scenario script (tests/clients/scenarios_*.py) runs in a client virtualenv of its own
(`make test` installs .venv-clients and .venv-clients-openai2; vLLM's pins in .venv never move) and
prints one JSON line {scenario: "ok" | "fail: ..."}; every scenario must be ok.

The scenarios are deterministic on a random model because every schema (tool parameters, response
formats) admits exactly one value and tool choices are forced (../shared/OPENAI.md). docs/clients.md
has the table of what each library does. The whole module takes 2 to 3 min on 2 shared CPU cores
(the server's start 45-85 s, the eight scripts 1.5-10 s each plus their imports, the stop ~7 s)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, start_cli, vllm_required

CLIENTS = ROOT / "tests" / "clients"
OPENAI3 = ".venv-clients"  # openai 3.x and the libraries that take it
OPENAI2 = ".venv-clients-openai2"  # instructor and llama-index pin openai<3
LIBRARIES = {  # library: (venv, script)
    "openai": (OPENAI3, "scenarios_openai.py"),
    "langchain": (OPENAI3, "scenarios_langchain.py"),
    "litellm": (OPENAI3, "scenarios_litellm.py"),
    "llm": (OPENAI3, "scenarios_llm.py"),
    "pydantic_ai": (OPENAI3, "scenarios_pydantic_ai.py"),
    "openai_agents": (OPENAI3, "scenarios_openai_agents.py"),
    "instructor": (OPENAI2, "scenarios_instructor.py"),
    "llama_index": (OPENAI2, "scenarios_llama_index.py"),
}


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    vllm_required()
    # --max-model-len 1024 (the tiny target's positions; start_cli's default is 512): the clients' own
    # tool and output-tool descriptions plus their schemas make prompts of ~500 tokens before max_tokens
    proc, url, log = start_cli(tiny, tmp_path_factory.mktemp("clients"), "--engine", "vllm",
                               "--tool-call-parser", "hermes", "--enable-auto-tool-choice",
                               "--disable-any-whitespace", "--max-model-len", "1024")
    yield url, log
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def client_python(venv: str) -> Path:
    python = ROOT / venv / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{venv}/bin/python is missing: `make clients` (which `make test` runs) creates it "
                    f"with the client libraries pinned in tests/clients/requirements*.txt")
    return python


def run_scenarios(library: str, url: str, tmp_path: Path) -> dict[str, str]:
    venv, script = LIBRARIES[library]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(OPENAI_API_KEY="none", HOME=str(tmp_path), LLM_USER_PATH=str(tmp_path / "llm"),
               LITELLM_LOCAL_MODEL_COST_MAP="True", OPENAI_AGENTS_DISABLE_TRACING="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([str(client_python(venv)), str(CLIENTS / script), "--base-url", url + "/v1",
                           "--model", "tiny"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    lines = proc.stdout.strip().splitlines()
    try:
        results = json.loads(lines[-1])
        assert isinstance(results, dict) and results
    except (IndexError, ValueError, AssertionError):
        pytest.fail(f"{script} printed no results (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                    f"{proc.stderr[-4000:]}")
    return results


@pytest.mark.vllm
@pytest.mark.parametrize("library", list(LIBRARIES))
def test_client_library_scenarios(server, library, tmp_path):
    url, log = server
    results = run_scenarios(library, url, tmp_path)
    failed = {name: outcome for name, outcome in results.items() if outcome != "ok"}
    assert not failed, (f"{library}: {len(failed)} of {len(results)} scenarios failed:\n"
                        + "\n".join(f"  {name}: {outcome}" for name, outcome in failed.items()))
