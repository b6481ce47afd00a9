"""What one choice of a generation has produced so far: its tokens, the engine's logprobs of each
(the predictions grounding checks quotes against) and its captured rows, in pieces."""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

from nla_serve.types import CapturedRows, StepOutput, TokenLogprob

if TYPE_CHECKING:
    import torch


class ChoiceState:
    def __init__(self, prompt_ids: list[int]) -> None:
        self.prompt_ids = prompt_ids
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob | None] = []  # one per token: the engine's view at the step
        self.rows: list[CapturedRows] = []  # contiguous pieces, in order
        self.prompt_logprobs: list[TokenLogprob] | None = None  # the distribution at each prompt position

    def add(self, step: StepOutput) -> None:
        self.token_ids.extend(step.token_ids)
        lps = step.logprobs or []
        self.logprobs.extend(lps[i] if i < len(lps) else None for i in range(len(step.token_ids)))
        if step.captured is not None:
            self.rows.append(step.captured)
        if step.prompt_logprobs is not None:
            self.prompt_logprobs = step.prompt_logprobs

    @property
    def ids(self) -> list[int]:
        """Prompt and completion tokens so far."""
        return self.prompt_ids + self.token_ids

    @property
    def n_rows(self) -> int:
        return self.rows[-1].end if self.rows else 0

    def row(self, p: int) -> "tuple[torch.Tensor, int | None]":
        """The row of position p ([d]) and the layer its piece says it was read at."""
        for piece in reversed(self.rows):
            if piece.start <= p < piece.end:
                return piece.rows[p - piece.start], piece.layer
        raise IndexError(f"no row for position {p} (rows 0..{self.n_rows - 1})")

    def token_at(self, p: int) -> int | None:
        ids = self.ids
        return ids[p] if p < len(ids) else None

    def predictions_at(self, p: int) -> list[int] | None:
        """Token ids the model ranked top at position ``p``: at the last prompt position and generated
        ones from the next token's logprobs (the sampled one included), at earlier prompt positions
        from the prompt's logprobs when the engine reported them (the top only: the prompt's next
        token was not the model's choice)."""
        if p < len(self.prompt_ids) - 1:
            if self.prompt_logprobs is None or p >= len(self.prompt_logprobs):
                return None
            return list(dict.fromkeys(tid for tid, _ in self.prompt_logprobs[p].top))
        j = p + 1 - len(self.prompt_ids)  # the completion token sampled from the distribution at p
        if j < 0 or j >= len(self.logprobs) or self.logprobs[j] is None:
            return None
        lp = self.logprobs[j]
        return list(dict.fromkeys([lp.token_id, *(tid for tid, _ in lp.top)]))

    def uncertainty(self, p: int) -> float | None:
        """The entropy (nats) of the next-token distribution at row ``p``, from the top-k logprobs
        of the token sampled from it, the residual mass counted as one outcome (a lower bound on
        the true entropy). None where that token has no logprobs (a prompt row before the last)."""
        j = p + 1 - len(self.prompt_ids)
        if j < 0 or j >= len(self.logprobs) or self.logprobs[j] is None:
            return None
        lp = self.logprobs[j]
        probs = {tid: math.exp(v) for tid, v in lp.top}
        probs.setdefault(lp.token_id, math.exp(lp.logprob) if math.isfinite(lp.logprob) else 0.0)
        rest = max(0.0, 1.0 - sum(probs.values()))
        return -sum(q * math.log(q) for q in [*probs.values(), rest] if q > 0)

    def context_at(self, p: int) -> tuple[list[int], list[int] | None]:
        """What the activation at ``p`` saw and what the model predicted there, as of now."""
        return self.ids, self.predictions_at(p)
