"""Which positions of a choice are explained, and when.

A position the plan picks whatever the choice's final length (explicit indices, prompt
positions, and in a stream ``auto``/``generated`` by stride: ``ExplainPlan.stable_positions``)
gets its job as soon as its row exists (``early``, called with every update that brings rows);
the rest are decided when the choice finishes (``final``, from ``choice_targets``), where a
position without a row is answered ``skipped`` with the reason. Each position is taken once.
Prompt rows are the same for every choice, so they are explained under choice 0 only.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from nla_serve.events import ExplanationEvent
from nla_serve.explain.pipeline import ExplanationPipeline, TokenAt
from nla_serve.explain.policy import ExplainPlan, choice_targets
from nla_serve.generation.choice import ChoiceState

# Hands a ready event, or one explanation's work that ends in one, to the request's stream.
Emit = Callable[["ExplanationEvent | Awaitable[ExplanationEvent]"], None]


class ChoiceExplainer:
    def __init__(self, index: int, choice: ChoiceState, plan: ExplainPlan, stable: list[int] | None,
                 pipeline: ExplanationPipeline, emit: Emit, decisions: Callable[[list[int]], list[int]] | None = None):
        self.index = index
        self.choice = choice
        self.plan = plan
        self.stable = stable or []  # positions explained as soon as their rows exist (sorted)
        self.pipeline = pipeline
        self.emit = emit
        self.decisions = decisions
        self.taken: set[int] = set()
        self.next_stable = 0  # index into ``stable``: those before it are taken

    @property
    def P(self) -> int:
        return len(self.choice.prompt_ids)

    def early(self) -> None:
        """While the choice generates: the stable positions whose rows now exist."""
        start, n_rows = self.next_stable, self.choice.n_rows
        end = start
        while end < len(self.stable) and self.stable[end] < n_rows:
            end += 1
        self.next_stable = end
        self._explain(p for p in self.stable[start:end] if self.index == 0 or p >= self.P)

    def final(self) -> None:
        """At the choice's end: every target the plan picks, rows or ``skipped``, then no more."""
        have = []
        for target in choice_targets(self.plan, self.index, self.P, len(self.choice.token_ids), self.choice.n_rows,
                                     self.choice.uncertainty):
            if target.skip_reason is None:
                have.append(target.position)
            elif self._take(target.position):
                event = self.pipeline.skipped_token(self._at(target.position), self.choice.token_at(target.position),
                                                    target.skip_reason)
                self.emit(event)
        self._explain(have)
        self._explain(self._decision_positions())

    def _decision_positions(self) -> list[int]:
        """Under ``auto``, the row before each token where the choice starts a tool call (the state
        that chose to act), on top of max_explanations: an agent's decisions are what an audit reads."""
        if self.decisions is None or self.plan.positions not in ("auto", "surprise") or not self.plan.enabled:
            return []
        G = len(self.choice.token_ids)
        return [p for k in self.decisions(self.choice.token_ids) if 0 <= (p := self.P + k - 1) < self.choice.n_rows
                and k < G]

    def _explain(self, positions) -> None:
        for p in positions:
            if self._take(p):
                row, layer = self.choice.row(p)
                self.emit(self.pipeline.explain_token(self._at(p), row, lambda p=p: self.choice.context_at(p), layer))

    def _take(self, p: int) -> bool:
        if p in self.taken:
            return False
        self.taken.add(p)
        return True

    def _at(self, p: int) -> TokenAt:
        return TokenAt(self.index, p, self.P)
