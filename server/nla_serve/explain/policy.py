"""Turn a request's ``explain`` field and the server defaults into a plan. Pure: no torch.

Positions count over prompt + completion (0 = first prompt token). The row at position p is the
layer-K state after reading token p. The last completion token is never fed through the model, so
it has no row: named policies never pick it, and an explicit index to it is answered ``skipped``.

Named policies (P prompt tokens, G generated, rows 0 .. P+G-2):
  auto       the last prompt token (where the model plans its answer) plus generated positions
             spread evenly, up to max_explanations in all
  last       the last position that has a row
  all        every position; evenly subsampled to max_explanations when longer
  prompt     prompt positions (subsampled likewise); generated: completion positions (likewise)
  {"every": n}   positions 0, n, 2n, ... (subsampled likewise)
  [i, j, ...]    exactly these indices; more than max_explanations is a 400
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nla_serve.config import MAX_EXPLANATION_TOKENS, ExplainDefaults
from nla_serve.errors import ClientError

NAMED = ("auto", "last", "all", "generated", "prompt")
OPTION_KEYS = {"positions", "max_explanations", "reconstruct", "temperature", "max_tokens", "min_fve",
               "on_low_fve", "seed"}


@dataclass(frozen=True)
class ExplainPlan:
    enabled: bool
    positions: str | int | tuple[int, ...]  # a named policy, an "every" stride, or explicit indices
    max_explanations: int
    reconstruct: bool = True
    temperature: float = 0.0
    max_tokens: int = 200
    min_fve: float | None = None
    on_low_fve: str = "flag"  # "flag" | "drop"
    seed: int | None = None
    explicit: bool = False  # the request asked for explanations (vs. the server default)

    def select(self, P: int, G: int) -> list[int]:
        """Positions to explain for a choice with P prompt and G generated tokens (sorted)."""
        n_rows = P + max(G, 1) - 1  # rows 0 .. P+G-2 (a prefill-only run has rows 0 .. P-1)
        cap = self.max_explanations
        pos = self.positions
        if isinstance(pos, tuple):
            return sorted(set(pos))
        if isinstance(pos, int):
            return spread(list(range(0, n_rows, pos)), cap)
        if pos == "last":
            return [n_rows - 1]
        if pos == "all":
            return spread(list(range(n_rows)), cap)
        if pos == "prompt":
            return spread(list(range(P)), cap)
        if pos == "generated":
            return spread(list(range(P, n_rows)), cap)
        # auto
        return [P - 1] + spread(list(range(P, n_rows)), cap - 1)


def spread(items: list[int], k: int) -> list[int]:
    """At most k items, evenly spaced, always keeping the last one."""
    if k <= 0:
        return []
    if len(items) <= k:
        return items
    if k == 1:
        return [items[-1]]
    step = (len(items) - 1) / (k - 1)
    return sorted({items[round(i * step)] for i in range(k)})


def _bad(msg: str, param: str = "explain") -> ClientError:
    return ClientError(msg, param=param)


def parse_positions(value: Any, limit: int) -> str | int | tuple[int, ...]:
    if isinstance(value, str):
        if value not in NAMED:
            raise _bad(f"explain.positions {value!r} is not one of {list(NAMED)}, {{'every': n}} or a list of "
                       "token indices", "explain.positions")
        return value
    if isinstance(value, dict):
        if set(value) != {"every"} or not isinstance(value["every"], int) or isinstance(value["every"], bool) \
                or value["every"] < 1:
            raise _bad("explain.positions as an object must be {\"every\": n} with an integer n >= 1",
                       "explain.positions")
        return int(value["every"])
    if isinstance(value, list):
        if not value:
            raise _bad("explain.positions is an empty list", "explain.positions")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise _bad("explain.positions must hold integer token indices", "explain.positions")
        if any(i < 0 for i in value):
            raise _bad("explain.positions holds a negative index; indices count from 0 over prompt + completion",
                       "explain.positions")
        if len(set(value)) > limit:
            raise _bad(f"explain.positions asks for {len(set(value))} positions; the limit is {limit}",
                       "explain.positions")
        return tuple(sorted(set(value)))
    raise _bad("explain.positions must be a string, {\"every\": n} or a list of indices", "explain.positions")


def make_plan(explain: Any, defaults: ExplainDefaults) -> ExplainPlan:
    """``explain`` is the raw request value: None (absent), a bool, or an options object."""
    limit = defaults.max_explanations_limit
    base = dict(positions=parse_positions(defaults.positions, limit), max_explanations=defaults.max_explanations,
                reconstruct=defaults.reconstruct, temperature=defaults.temperature, max_tokens=defaults.max_tokens)
    if explain is None:
        return ExplainPlan(enabled=defaults.enabled, **base)
    if isinstance(explain, bool):
        return ExplainPlan(enabled=explain, explicit=explain, **base)
    if not isinstance(explain, dict):
        raise _bad("explain must be true, false or an object")
    unknown = sorted(set(explain) - OPTION_KEYS)
    if unknown:
        raise _bad(f"explain has unknown field(s) {unknown}; known: {sorted(OPTION_KEYS)}", f"explain.{unknown[0]}")
    opts = dict(base)
    if "positions" in explain:
        opts["positions"] = parse_positions(explain["positions"], limit)
    if "max_explanations" in explain:
        m = explain["max_explanations"]
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= limit:
            raise _bad(f"explain.max_explanations must be an integer from 1 to {limit} (the server's limit)",
                       "explain.max_explanations")
        opts["max_explanations"] = m
    if "reconstruct" in explain:
        if not isinstance(explain["reconstruct"], bool):
            raise _bad("explain.reconstruct must be true or false", "explain.reconstruct")
        opts["reconstruct"] = explain["reconstruct"]
    if "temperature" in explain:
        t = explain["temperature"]
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 2:
            raise _bad("explain.temperature must be a number from 0 to 2", "explain.temperature")
        opts["temperature"] = float(t)
    if "max_tokens" in explain:
        m = explain["max_tokens"]
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= MAX_EXPLANATION_TOKENS:
            raise _bad(f"explain.max_tokens must be an integer from 1 to {MAX_EXPLANATION_TOKENS}",
                       "explain.max_tokens")
        opts["max_tokens"] = m
    if explain.get("min_fve") is not None:
        f = explain["min_fve"]
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not -10 <= f <= 1:
            raise _bad("explain.min_fve must be a number <= 1", "explain.min_fve")
        opts["min_fve"] = float(f)
    if "on_low_fve" in explain:
        if explain["on_low_fve"] not in ("flag", "drop"):
            raise _bad("explain.on_low_fve must be 'flag' or 'drop'", "explain.on_low_fve")
        opts["on_low_fve"] = explain["on_low_fve"]
    if explain.get("seed") is not None:
        if not isinstance(explain["seed"], int) or isinstance(explain["seed"], bool):
            raise _bad("explain.seed must be an integer", "explain.seed")
        opts["seed"] = explain["seed"]
    if isinstance(opts["positions"], tuple) and len(opts["positions"]) > opts["max_explanations"]:
        if "max_explanations" in explain:
            raise _bad(f"explain.positions lists {len(opts['positions'])} positions but max_explanations is "
                       f"{opts['max_explanations']}", "explain.positions")
        opts["max_explanations"] = len(opts["positions"])  # an explicit list sets its own count
    return ExplainPlan(enabled=True, explicit=True, **opts)
