"""What every client scenario script shares: the command line, the deterministic shapes the tiny
random model can only answer one way, and the runner that prints one JSON line of results.

A script is run as ``python SCRIPT --base-url http://127.0.0.1:PORT/v1 --model tiny`` with a client
virtualenv's interpreter (never the server's); its last stdout line is ``{scenario: "ok" | "fail: ..."}``.
The server runs with ``--disable-any-whitespace``, so a schema whose fields are ``const`` or a
one-value ``enum`` makes even a random model write exact JSON (../../../shared/OPENAI.md).
"""

# (no `from __future__ import annotations`: llama-index and others read get_weather's annotations at runtime)
import argparse
import json
import sys
import time
import traceback
from typing import Callable, Literal

from pydantic import BaseModel

API_KEY = "none"  # the test server takes no key; clients insist on one
MAX_TOKENS = 100  # byte-level tokens: a JSON object of a few fields fits well inside
QUESTION = "What is the weather in Paris?"
WEATHER_ARGS = {"city": "Paris"}
# the chat-completions tool, as JSON (for clients that take raw tool specs)
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris"]}},
                      "required": ["city"], "additionalProperties": False}
# With tool_choice "required" the scenarios also send parallel_tool_calls=False: the grammar otherwise
# allows any number of calls, and a random model writes call after call until max_tokens.
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                 "parameters": WEATHER_PARAMETERS}}


class Weather(BaseModel):
    """The weather report asked for."""

    city: Literal["Paris"]


def get_weather(city: Literal["Paris"]) -> str:
    """Weather of a city."""
    return f"sunny in {city}"


class Failed(AssertionError):
    pass


def check(condition: object, message: str) -> None:
    """An assertion that survives ``python -O`` and says what was seen."""
    if not condition:
        raise Failed(message)


def explanations_present(raw: object, where: str) -> None:
    """The server's `explanations` field: a non-empty list in a raw JSON body or an SDK object."""
    extra = raw if isinstance(raw, dict) else (getattr(raw, "model_extra", None) or {})
    items = extra.get("explanations")
    check(isinstance(items, list) and len(items) > 0, f"{where}: no explanations in the raw response "
                                                      f"(keys: {sorted(extra)[:20]})")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True, help="the server's OpenAI base URL, ending in /v1")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    return ap.parse_args()


def run(scenarios: dict[str, Callable[[argparse.Namespace], None]]) -> None:
    """Run each scenario once, in order; print progress on stderr and the results as the last stdout line."""
    args = parse_args()
    only = {s for s in args.only.split(",") if s}
    results: dict[str, str] = {}
    for name, fn in scenarios.items():
        if only and name not in only:
            continue
        t0 = time.monotonic()
        try:
            fn(args)
            results[name] = "ok"
        except Exception as e:  # a scenario's failure is data, not a crash
            traceback.print_exc(file=sys.stderr)
            results[name] = f"fail: {type(e).__name__}: {e}"[:1500]
        print(f"[{name}] {results[name][:200]} ({time.monotonic() - t0:.1f}s)", file=sys.stderr, flush=True)
    print(json.dumps(results), flush=True)
