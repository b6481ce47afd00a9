"""One request's explanations, from a captured row to an ``ExplanationEvent``: the single pipeline
that generations (``generation/``) and raw vectors (``/v1/explanations``) both go through.

    row ──> job on the worker (verbalize, score; the worker owns the deadline)
        ──> ground its quotes against what the activation saw and what the model predicted there
        ──> the operator's monitor rules (an ``abort`` rule asks the owner to stop the generation)
        ──> metrics ──> ExplanationEvent (with its layer, token and the row's digest)

Nothing here watches the clock or decides which positions to explain: the worker resolves every
job (``skipped`` past the deadline), and the plan's positions are the generation's business.

A ``/v1/explanations`` request may bring hypotheses (user-written claims): they ride on the plan
(``PlanWithHypotheses``), which reaches every job of the request, from raw vectors and from
positions alike, without the generation path having to know of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from nla_serve.events import ExplanationEvent
from nla_serve.explain.grounding import Grounding, ground
from nla_serve.explain.policy import ExplainPlan
from nla_serve.explain.worker import ExplanationJob
from nla_serve.types import Explanation

if TYPE_CHECKING:
    import torch

log = logging.getLogger("nla_serve.request")


def row_digest(row: "torch.Tensor") -> tuple[str, str]:
    """SHA-256 of a captured row's bytes as captured (its dtype, native little-endian), and the dtype."""
    import torch

    flat = row.detach().contiguous().reshape(-1).cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest(), str(flat.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PlanWithHypotheses(ExplainPlan):
    """An ``ExplainPlan`` that also carries the request's hypotheses to each of its jobs
    (``ExplanationJob.for_plan``); everything else reads it as the plan it extends."""

    hypotheses: tuple[str, ...] = ()


def with_hypotheses(plan: ExplainPlan, hypotheses: list[str] | None) -> ExplainPlan:
    """``plan``, carrying ``hypotheses`` when there are any."""
    if not hypotheses:
        return plan
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    return PlanWithHypotheses(**fields | {"hypotheses": tuple(hypotheses)})


@dataclass(frozen=True)
class TokenAt:
    """Where a generation's activation sits: position ``position`` of choice ``choice_index``,
    whose prompt has ``num_prompt_tokens`` tokens."""

    choice_index: int
    position: int
    num_prompt_tokens: int


# What a position saw, asked when its explanation resolves (the choice has grown meanwhile):
# the token ids 0..position at least, and the model's top next-token ids there (None: unknown).
ContextAt = Callable[[], "tuple[list[int], list[int] | None]"]


class ExplanationPipeline:
    """Explanations of one request. ``on_abort(event)`` is called when a monitor rule with the
    ``abort`` action matches; the owner decides whether there is still a generation to stop."""

    def __init__(self, *, worker, tokenizer, monitoring, metrics, plan: ExplainPlan, request_id: str,
                 model_name: str, arrived: float | None, layer: int | None,
                 on_abort: Callable[[ExplanationEvent], None] | None = None, adapter: str | None = None):
        self.worker = worker
        self.tokenizer = tokenizer
        self.monitoring = monitoring
        self.metrics = metrics
        self.plan = plan
        self.request_id = request_id
        self.model_name = model_name
        self.arrived = arrived
        self.layer = layer
        self.on_abort = on_abort
        self.adapter = adapter  # the LoRA adapter whose activations these are (every token event says it)

    # -- tokens of a generation --------------------------------------------------------------

    async def explain_token(self, at: TokenAt, row: "torch.Tensor", context: ContextAt,
                            layer: int | None = None) -> ExplanationEvent:
        """The event of the row at ``at``, once its job resolves (never raises for the job's
        sake: a failed verbalizer is a ``failed`` explanation). ``layer``: the rows' own."""
        digest = row_digest(row)
        exp = await self.worker.submit(ExplanationJob.for_plan(self.plan, self.request_id, row, self.arrived))
        ids, predicted = context()
        p = at.position
        token = self.tokenizer.decode([ids[p]], skip_special_tokens=False)
        grounding = self._ground(ids, p, predicted, exp)
        source = "prompt" if p < at.num_prompt_tokens else "completion"
        matched = self.monitoring.check(
            text=exp.text, fve=exp.fve, grounding=grounding.score if grounding else None, source=source,
            choice_index=at.choice_index, token_index=p, token=token,
            request={"id": self.request_id, "model": self.model_name}, claims=exp.claims)
        event = ExplanationEvent(exp, at.choice_index, p, ids[p], at.num_prompt_tokens, token=token,
                                 layer=self.layer if layer is None else layer, activation_sha256=digest[0],
                                 activation_dtype=digest[1], grounding=grounding, monitor_events=matched,
                                 adapter=self.adapter)
        self._maybe_abort(event)
        return event

    def answered(self) -> None:
        """The generation's answer has ended: its remaining explanations yield to live answers'."""
        self.worker.answered(self.request_id)

    def skipped_token(self, at: TokenAt, token_id: int | None, reason: str) -> ExplanationEvent:
        """A position the plan picked that cannot be explained (no row), answered at once."""
        token = None if token_id is None else self.tokenizer.decode([token_id], skip_special_tokens=False)
        return ExplanationEvent(Explanation(status="skipped", reason=reason), at.choice_index, at.position,
                                token_id, at.num_prompt_tokens, token=token, layer=self.layer, adapter=self.adapter)

    def _ground(self, ids: list[int], p: int, predicted: list[int] | None, exp: Explanation) -> Grounding | None:
        """``exp``'s quotes against the text the activation at ``p`` saw (tokens 0..p, special
        tokens kept: the template is part of what the target read), its last two tokens, and its
        predictions."""
        if exp.text is None:
            return None
        text = self.tokenizer.decode(ids[:p + 1], skip_special_tokens=False)
        tokens = None if predicted is None else [self.tokenizer.decode([t], skip_special_tokens=False)
                                                 for t in predicted]
        last = [self.tokenizer.decode([t], skip_special_tokens=False) for t in ids[max(p - 1, 0):p + 1]]
        grounding = ground(exp.text, text, tokens, last)
        self.metrics.record_grounding(grounding.score)
        return grounding

    def _maybe_abort(self, event: ExplanationEvent) -> None:
        if self.on_abort is not None and any(m.action == "abort" for m in event.monitor_events):
            self.on_abort(event)

    # -- raw vectors -------------------------------------------------------------------------

    async def explain_vector(self, index: int, vector: "torch.Tensor",
                             digest: tuple[str, str] | None = None) -> ExplanationEvent:
        """The event of one raw vector (no context: nothing to ground its quotes against);
        ``digest``: its ``row_digest`` when the caller has it already."""
        digest = digest or row_digest(vector)
        exp = await self.worker.submit(ExplanationJob.for_plan(self.plan, self.request_id, vector, self.arrived))
        matched = self.monitoring.check(text=exp.text, fve=exp.fve, grounding=None, source="vector",
                                        token_index=index, request={"id": self.request_id, "model": self.model_name},
                                        claims=exp.claims)
        return ExplanationEvent(exp, layer=self.layer, vector_index=index, activation_sha256=digest[0],
                                activation_dtype=digest[1], monitor_events=matched)

    def cancel(self) -> None:
        """Resolve whatever of this request is still pending as ``skipped`` (it ended, or its
        client went away)."""
        self.worker.cancel(self.request_id)
