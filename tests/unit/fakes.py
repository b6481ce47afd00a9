"""Scripted stand-ins for the parts a request touches, for unit tests without models or HTTP.

``ScriptedEngine`` follows the ``TargetEngine`` contract as vLLM does (rows one update behind the
tokens, the rest with the final update; positions 0 .. P+G-2); ``ScriptedRuntime`` is what the
explanation worker drives (verbalize, then score). Both are real implementations of their
interfaces with deterministic output, not mocks of calls.
"""

from __future__ import annotations

import asyncio

import torch

from nla_serve.types import CapturedRows, Explanation, Prompt, SamplingOptions, StepOutput, TokenLogprob

D = 8


def row_for(position: int) -> torch.Tensor:
    """The row the scripted engine reports at ``position``: distinct per position."""
    return torch.arange(D, dtype=torch.float32) + 100.0 * position


class ScriptedTokenizer:
    """Token id t decodes to "<t>" (ids are their own text, so tests can read contexts)."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(f"<{i}>" for i in ids)

    def __len__(self) -> int:
        return 1000


class ScriptedEngine:
    """Generates ``tokens`` (the same for every choice), one per step, ``step_delay`` s apart."""

    hidden_size = D
    num_layers = 4
    max_model_len = 512
    constrains_decoding = False

    def __init__(self, tokens: list[int], *, layer: int = 2, step_delay: float = 0.0, fail_after: int | None = None):
        self.tokens = tokens
        self.layer = layer
        self.step_delay = step_delay
        self.fail_after = fail_after
        self.tokenizer = ScriptedTokenizer()
        self.aborted: list[str] = []
        self.requests: list[tuple[Prompt, SamplingOptions, bool]] = []
        self._stop: set[str] = set()

    def in_flight(self) -> dict[str, int]:
        return {}

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._stop.add(request_id)

    async def generate(self, prompt: Prompt, options: SamplingOptions, request_id: str, capture: bool = True,
                       intervention=None, adapter=None):
        self.requests.append((prompt, options, capture))
        P = len(prompt.token_ids)
        tokens = self.tokens[:options.max_tokens]
        for index in range(options.n):
            sent_rows = 0
            for g, tok in enumerate(tokens):
                if self.step_delay:
                    await asyncio.sleep(self.step_delay)
                else:
                    await asyncio.sleep(0)
                if self.fail_after is not None and g >= self.fail_after:
                    raise RuntimeError("the scripted engine failed")
                stopped = request_id in self._stop
                last = g == len(tokens) - 1 or stopped
                # rows known now: every token fed so far (prompt, then generated ones but the newest)
                fed = P + g
                upto = fed if last else fed - 1  # one update behind, all at the end
                captured = None
                if capture and upto > sent_rows:
                    rows = torch.stack([row_for(p) for p in range(sent_rows, upto)])
                    captured = CapturedRows(sent_rows, rows, layer=self.layer)
                    sent_rows = upto
                lp = None
                if options.logprobs is not None:
                    top = [(tok, -0.1)] + [(900 + k, -1.0 - k) for k in range(options.logprobs)]
                    lp = [TokenLogprob(tok, -0.1, top[:options.logprobs])]
                prompt_lps = None
                if options.prompt_logprobs and g == 0:  # the top at prompt position p: id 500 + p
                    prompt_lps = [TokenLogprob(prompt.token_ids[p + 1], -2.0,
                                               [(500 + p, -0.1)][:options.prompt_logprobs]) for p in range(P - 1)]
                yield StepOutput(index, [tok], f"<{tok}>", finished=last,
                                 finish_reason=("abort" if stopped else "length") if last else None,
                                 captured=captured, num_prompt_tokens=P, logprobs=lp, prompt_logprobs=prompt_lps)
                if last:
                    break


class ScriptedRuntime:
    """Explains a vector as the text 'position N "<t>"' where N is read back from the row, with
    fve 0.5; ``delay`` s per explanation."""

    def __init__(self, delay: float = 0.0, text: str | None = None):
        self.delay = delay
        self.text = text
        self.verbalized = 0

    async def verbalize(self, vectors, *, temperature=0.0, max_tokens=200, seed=None, request_id=None):
        await asyncio.sleep(self.delay)
        self.verbalized += len(vectors)
        out = []
        for v in vectors:
            p = int(round(float(v[0]) / 100.0))
            out.append(Explanation(status="ok", text=self.text or f'the token at position {p} is "<{p}>"', tokens=7))
        return out

    async def score(self, results, vectors, reconstruct=True) -> None:
        for r in results:
            if r.text is not None:
                r.fve, r.cos, r.mse = 0.5, 0.9, 0.2


class Recorded:
    """Metrics that only count what the request path reports."""

    model_name = "scripted"

    def __init__(self):
        self.finished: list[str] = []
        self.grounding: list = []

    def record_first_token(self, *a): pass
    def record_tokens(self, *a): pass
    def record_explanation(self, *a, **k): pass
    def record_grounding(self, score): self.grounding.append(score)
    def record_monitor(self, *a): pass
    def record_finished(self, prompt_tokens, reason, seconds): self.finished.append(reason)


class Tracker:
    def __init__(self):
        self.live: dict = {}

    def track(self, rid, end):
        self.live[rid] = end

    def untrack(self, rid):
        self.live.pop(rid, None)
