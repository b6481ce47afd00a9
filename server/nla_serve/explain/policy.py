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


def _number(explain: dict, key: str, lo: float | None, hi: float | None, *, integer: bool = False,
            why: str | None = None) -> float | int:
    """``explain[key]`` if it is a number (an int when ``integer``; never a bool) within [lo, hi]."""
    v = explain[key]
    kind = (int,) if integer else (int, float)
    in_range = (lo is None or v >= lo) and (hi is None or v <= hi) if isinstance(v, kind) else False
    if isinstance(v, bool) or not isinstance(v, kind) or not in_range:
        what = "an integer" if integer else "a number"
        rng = why or (f"from {lo} to {hi}" if lo is not None else "")
        raise _bad(f"explain.{key} must be {what} {rng}".rstrip(), f"explain.{key}")
    return v


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
        opts["max_explanations"] = _number(explain, "max_explanations", 1, limit, integer=True,
                                           why=f"from 1 to {limit} (the server's limit)")
    if "reconstruct" in explain:
        if not isinstance(explain["reconstruct"], bool):
            raise _bad("explain.reconstruct must be true or false", "explain.reconstruct")
        opts["reconstruct"] = explain["reconstruct"]
    if "temperature" in explain:
        opts["temperature"] = float(_number(explain, "temperature", 0, 2))
    if "max_tokens" in explain:
        opts["max_tokens"] = _number(explain, "max_tokens", 1, MAX_EXPLANATION_TOKENS, integer=True)
    if explain.get("min_fve") is not None:
        opts["min_fve"] = float(_number(explain, "min_fve", -10, 1, why="<= 1"))
    if "on_low_fve" in explain:
        if explain["on_low_fve"] not in ("flag", "drop"):
            raise _bad("explain.on_low_fve must be 'flag' or 'drop'", "explain.on_low_fve")
        opts["on_low_fve"] = explain["on_low_fve"]
    if explain.get("seed") is not None:
        opts["seed"] = _number(explain, "seed", None, None, integer=True)
    if isinstance(opts["positions"], tuple) and len(opts["positions"]) > opts["max_explanations"]:
        if "max_explanations" in explain:
            raise _bad(f"explain.positions lists {len(opts['positions'])} positions but max_explanations is "
                       f"{opts['max_explanations']}", "explain.positions")
        opts["max_explanations"] = len(opts["positions"])  # an explicit list sets its own count
    return ExplainPlan(enabled=True, explicit=True, **opts)
