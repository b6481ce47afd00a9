"""The reference engine's logits processing, with vLLM's semantics so that both engines pick the
same greedy tokens for the same request: ``logit_bias`` is added and ``min_tokens`` holds back the
stop ids first (vLLM's built-in logits processors), then the penalties (vLLM's
``apply_penalties``): the repetition penalty divides positive and multiplies negative logits of
every token seen in the prompt or the output, the frequency penalty subtracts its value once per
occurrence in the output, the presence penalty once per distinct output token. ``min_p`` acts after
the temperature, in ``sample``. Logprobs stay the raw ones (vLLM's default), computed before this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from nla_serve.types import SamplingOptions

if TYPE_CHECKING:
    import torch


def shapes_logits(options: SamplingOptions) -> bool:
    """Whether ``process`` can change anything for these options (the common case skips it)."""
    return bool(options.logit_bias or options.min_tokens or options.presence_penalty
                or options.frequency_penalty or options.repetition_penalty != 1.0)


def process(logits: "torch.Tensor", options: SamplingOptions, prompt_ids: list[int], generated: list[int],
            stop_ids: Iterable[int]) -> "torch.Tensor":
    """logits: [V] float32 (not modified) -> the logits the sampler should see."""
    import torch

    if not shapes_logits(options):
        return logits
    out = logits.clone()
    vocab = out.shape[-1]
    for token, bias in options.logit_bias:
        if 0 <= token < vocab:
            out[token] += bias
    if len(generated) < options.min_tokens:
        held = [t for t in stop_ids if 0 <= t < vocab]
        if held:
            out[torch.tensor(held)] = float("-inf")
    if options.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(generated)), dtype=torch.long)
        seen = seen[seen < vocab]
        values = out[seen]
        out[seen] = torch.where(values > 0, values / options.repetition_penalty, values * options.repetition_penalty)
    if generated and (options.frequency_penalty or options.presence_penalty):
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=vocab)[:vocab].to(out.dtype)
        out -= options.frequency_penalty * counts + options.presence_penalty * (counts > 0).to(out.dtype)
    return out


def apply_min_p(logits: "torch.Tensor", min_p: float) -> "torch.Tensor":
    """Drop tokens whose probability is below ``min_p`` times the top token's (logits after temperature)."""
    import torch

    if min_p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
