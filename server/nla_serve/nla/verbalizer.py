"""Vectors -> explanation texts with an AV, on any engine that accepts one injected embedding row.

The recipe (docs/design.md, ../shared/NLA.md): the AV's canonical prompt (its template filled with
the marker character, one user message, its own chat template with the generation prompt) is
tokenized once at load; for each vector v, the marker's embedding row is *replaced* by
``v * injection_scale / max(||v||, 1e-12)`` computed in fp32 (the engine casts it once to its
dtype, and no architecture embedding scale touches that row). Generation stops on
``</expl`` (the closing tag's first two tokens: its last two would be decoded for nothing) and on
every id of the AV's EOS set; the body between the tags is the explanation, and a missing closing
tag means the output was cut short. An AV trained by nla-serve always opens its answer with
``<explanation>`` and a line break, so those tokens are fed as part of the prompt instead of
decoded (``AVCheckpoint.answer_prefix_ids``): on the shipped NLA the two save 7 of about 44
verbaliser steps per explanation, with the same text (docs/benchmarks.md).

Many vectors go to the engine at once; vLLM batches them (mixed-mode prompt embeddings).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nla_serve.nla.checkpoint import ANSWER_PREFIX, AVCheckpoint
from nla_serve.types import Prompt, SamplingOptions

if TYPE_CHECKING:
    import torch

    from nla_serve.engines import TargetEngine

OPEN, CLOSE = "<explanation>", "</explanation>"
STOP = CLOSE[:6]  # "</expl": no explanation's words contain it
_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


@dataclass
class Verbalization:
    body: str  # the explanation text, tags stripped
    raw: str  # everything the AV wrote
    closed: bool  # the closing tag was written
    tokens: int
    finish_reason: str | None
    broken: str | None = None  # why the output cannot be an explanation (e.g. CJK-only)
    token_ids: list[int] | None = None


def injection_row(v: "torch.Tensor", scale: float) -> "torch.Tensor":
    """v: [d] -> [d] float32 with norm ``scale`` (a zero vector stays zero)."""
    import torch

    v = v.detach().to(torch.float32).cpu()
    return v * (scale / v.norm().clamp_min(1e-12))


def parse_explanation(raw: str) -> tuple[str, bool]:
    """-> (body, closed). The body lies after ``<explanation>`` (if present) and before
    ``</expl`` (the closing tag, as far as generation writes it); without it, everything after the
    opening tag is returned."""
    start = raw.find(OPEN)
    body = raw[start + len(OPEN):] if start >= 0 else raw
    end = body.find(STOP)  # generation stops there; a closing tag written whole starts with it too
    if end >= 0:
        return body[:end].strip(), True
    return body.strip(), False


def broken_reason(body: str) -> str | None:
    letters = [c for c in body if c.isalpha()]
    if not letters:
        return "the verbalizer wrote no words"
    if all(_CJK.match(c) for c in letters):
        return "the verbalizer answered entirely in CJK script, the sign of a broken injection"
    return None


class Verbalizer:
    """Explain vectors with one AV running on ``engine`` (started, with prompt embeddings on)."""

    def __init__(self, checkpoint: AVCheckpoint, engine: "TargetEngine"):
        self.ckpt = checkpoint
        self.engine = engine
        self.prefix_text = ANSWER_PREFIX if checkpoint.answer_prefix_ids else ""

    def prompt_for(self, v: "torch.Tensor") -> Prompt:
        return Prompt(list(self.ckpt.prompt_ids) + list(self.ckpt.answer_prefix_ids), inject_at=self.ckpt.inject_at,
                      inject_row=injection_row(v, self.ckpt.injection_scale))

    def sampling(self, temperature: float = 0.0, max_tokens: int = 200, seed: int | None = None) -> SamplingOptions:
        return SamplingOptions(max_tokens=max_tokens, temperature=temperature, seed=seed, stop=(STOP,),
                               stop_token_ids=self.ckpt.eos_ids, include_stop_str_in_output=True)

    async def verbalize(self, vectors: "torch.Tensor", *, temperature: float = 0.0, max_tokens: int = 200,
                        seed: int | None = None, request_id: str | None = None) -> list[Verbalization]:
        """vectors: [N, d] -> N verbalizations, in order."""
        from nla_serve.engines import generate_all

        if vectors.ndim != 2 or vectors.shape[1] != self.ckpt.d_model:
            raise ValueError(f"vectors must be [N, {self.ckpt.d_model}], got {list(vectors.shape)}")
        prompts = [self.prompt_for(v) for v in vectors]
        done = await generate_all(self.engine, prompts, self.sampling(temperature, max_tokens, seed),
                                  request_id or f"av-{uuid.uuid4().hex[:12]}")
        out = []
        for c in done:
            if c.error is not None:
                out.append(Verbalization(body="", raw=c.text, closed=False, tokens=len(c.token_ids),
                                         finish_reason=None, broken=c.error, token_ids=c.token_ids))
                continue
            raw = self.prefix_text + c.text  # what the AV's answer is, the fed opening included
            body, closed = parse_explanation(raw)
            out.append(Verbalization(body=body, raw=raw, closed=closed, tokens=len(c.token_ids),
                                     finish_reason=c.finish_reason, broken=broken_reason(body),
                                     token_ids=c.token_ids))
        return out
