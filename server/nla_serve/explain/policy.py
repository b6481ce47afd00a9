"""Turn a request's ``explain`` field and the server defaults into a plan, and a plan into the
positions of each choice to explain. Pure: no torch.

Positions count over prompt + completion (0 = first prompt token). The row at position p is the
layer-K state after reading token p. The last completion token is never fed through the model, so
it has no row: named policies never pick it, and an explicit index to it is answered ``skipped``.

Named policies (P prompt tokens, G generated, rows 0 .. P+G-2):
  auto       the last prompt token (where the model plans its answer) plus generated positions
             spread evenly, up to max_explanations in all (streamed: every ``stride`` tokens from
             the first, the stride spreading the slots over max_tokens; see ``streamed``)
  last       the last position that has a row
  all        every position; evenly subsampled to max_explanations when longer
  prompt     prompt positions (subsampled likewise); generated: completion positions (likewise)
  surprise   the max_explanations positions, from the last prompt token on, where the model was least
             sure of its next token (the entropy of its next-token distribution, estimated from the
             top-5 logprobs the engine reports with the residual mass as one outcome: a lower bound):
             the decisions. Chosen when the choice ends (also in a stream); without logprobs, ``auto``
  {"every": n}   positions 0, n, 2n, ... (subsampled likewise)
  [i, j, ...]    exactly these indices; more than max_explanations is a 400
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from nla_serve.config import ExplainDefaults
from nla_serve.errors import ClientError
from nla_serve.explain.options import Every, ExplainOptions, Positions


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
    min_grounding: float | None = None  # share of quotes found (explain/grounding.py)
    on_low_grounding: str = "flag"  # "flag" | "drop"
    seed: int | None = None
    deadline_s: float | None = None  # from the request's arrival
    claims: bool = False  # each explanation's claims scored for support by the AR
    explicit: bool = False  # the request asked for explanations (vs. the server default)
    # Streaming: ``auto`` and ``generated`` place generated positions every ``stride`` tokens from
    # the first (G is unknown while tokens stream), so a position's job can start as soon as its
    # row exists. None: spread evenly over the finished choice (non-streaming requests).
    stride: int | None = None

    def below_min_fve(self, fve: float | None) -> bool | None:
        """Whether ``fve`` is under the request's ``min_fve`` (None: no minimum or no number)."""
        return None if self.min_fve is None or fve is None else fve < self.min_fve

    def below_min_grounding(self, score: float | None) -> bool | None:
        """Likewise for ``min_grounding`` (an explanation that quotes nothing has no score)."""
        return None if self.min_grounding is None or score is None else score < self.min_grounding

    def drops(self, below_fve: bool | None, below_grounding: bool | None) -> bool:
        """Whether an item so flagged is left out of a response (the audit record keeps it)."""
        return bool((below_fve and self.on_low_fve == "drop") or (below_grounding and self.on_low_grounding == "drop"))

    def explains_inner_prompt(self, P: int) -> bool:
        """Whether this plan may pick a prompt position before the last, where no generated token
        tells what the model predicted (the engine must then report the prompt's logprobs)."""
        pos = self.positions
        if isinstance(pos, tuple):
            return any(p < P - 1 for p in pos)
        return isinstance(pos, int) or pos in ("all", "prompt")

    def streamed(self, max_tokens: int) -> "ExplainPlan":
        """This plan for a streamed request of at most ``max_tokens`` tokens: the generated slots
        (``max_explanations``, less one for ``auto``'s prompt position) spread over max_tokens."""
        if self.positions not in ("auto", "generated"):
            return self
        slots = max(1, self.max_explanations - (1 if self.positions == "auto" else 0))
        return dataclasses.replace(self, stride=max(1, max_tokens // slots))

    def stable_positions(self, P: int) -> list[int] | None:
        """The positions this plan picks whatever the choice's final length (sorted), which can
        be explained while the choice still generates, each once its row exists. None when the
        selection depends on the final length (``last``, ``all``, ``every``, non-streamed ``auto``)."""
        pos = self.positions
        if not (isinstance(pos, tuple) or pos == "prompt" or self.stride is not None):
            return None
        return self.select(P, 1 << 30)

    def select(self, P: int, G: int, uncertainty: Callable[[int], float | None] | None = None) -> list[int]:
        """Positions to explain for a choice with P prompt and G generated tokens (sorted);
        ``uncertainty(p)`` (the next-token entropy at row p) is what ``surprise`` ranks by."""
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
            if self.stride is not None:
                return [p for p in range(P, P + cap * self.stride, self.stride) if p < n_rows]
            return spread(list(range(P, n_rows)), cap)
        if pos == "surprise" and uncertainty is not None and G > 0:
            rows = range(P - 1, n_rows)  # the rows whose next token was sampled
            scored = [(u, p) for p in rows if (u := uncertainty(p)) is not None]
            if scored:
                return sorted(p for _, p in sorted(scored, key=lambda up: (-up[0], up[1]))[:cap])
        # auto (and surprise without the entropies it ranks by)
        if self.stride is not None:
            return [P - 1] + [p for p in range(P, P + (cap - 1) * self.stride, self.stride) if p < n_rows]
        return [P - 1] + spread(list(range(P, n_rows)), cap - 1)


@dataclass(frozen=True)
class Target:
    """One position of a choice to explain, or to answer ``skipped`` with ``skip_reason``."""

    position: int
    skip_reason: str | None = None


def choice_targets(plan: ExplainPlan, index: int, P: int, G: int, n_rows: int,
                   uncertainty: Callable[[int], float | None] | None = None) -> list[Target]:
    """What to explain for choice ``index`` (P prompt tokens, G generated, ``n_rows`` rows captured).

    Prompt rows are identical across choices, so they are explained once, under choice 0. A
    position without a row is answered ``skipped``: the last generated token never has one."""
    positions = plan.select(P, G, uncertainty)
    if index > 0:
        positions = [p for p in positions if p >= P]
    total = P + G
    out = []
    for p in positions:
        if p < n_rows:
            out.append(Target(p))
        elif p == total - 1:
            out.append(Target(p, "the last generated token is never fed through the model, so it has no activation"))
        else:
            out.append(Target(p, f"position {p} is beyond this choice's {total} tokens"))
    return out


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


def _positions(value: Positions) -> str | int | tuple[int, ...]:
    if isinstance(value, Every):
        return value.every
    if isinstance(value, list):
        return tuple(sorted(set(value)))
    return value


def make_plan(explain: bool | ExplainOptions | None, defaults: ExplainDefaults, *, field: str = "explain") -> ExplainPlan:
    """``explain``: None (absent: the server's policy), a bool, or validated options. ``field``
    is where the options were sent, for error params: ``explain`` in a generation request, ``""``
    for the top-level fields of ``/v1/explanations``."""

    def param(name: str) -> str:
        return f"{field}.{name}" if field else name

    base = dict(positions=defaults.positions,
                max_explanations=defaults.max_explanations, reconstruct=defaults.reconstruct,
                temperature=defaults.temperature, max_tokens=defaults.max_tokens, deadline_s=defaults.deadline_s,
                claims=defaults.claims)
    if explain is None:
        return ExplainPlan(enabled=defaults.enabled, **base)
    if isinstance(explain, bool):
        return ExplainPlan(enabled=explain, explicit=explain, **base)
    given = {k: v for k, v in explain.model_dump(include=set(ExplainOptions.model_fields)).items() if v is not None}
    if "positions" in given:
        given["positions"] = _positions(explain.positions)
    opts = base | given
    if defaults.claims_required:  # a monitor rule reads claims: a request cannot turn them off
        opts["claims"] = True
    limit = defaults.max_explanations_limit
    if opts["max_explanations"] > limit:
        raise ClientError(f"{param('max_explanations')} is {opts['max_explanations']}; the server's limit is {limit}",
                          param=param("max_explanations"))
    positions = opts["positions"]
    if isinstance(positions, tuple):
        if len(positions) > limit:
            raise ClientError(f"{param('positions')} asks for {len(positions)} positions; the limit is {limit}",
                              param=param("positions"))
        if len(positions) > opts["max_explanations"]:
            if "max_explanations" in given:
                raise ClientError(f"{param('positions')} lists {len(positions)} positions but max_explanations is "
                                  f"{opts['max_explanations']}", param=param("positions"))
            opts["max_explanations"] = len(positions)  # an explicit list sets its own count
    return ExplainPlan(enabled=True, explicit=True, **opts)
