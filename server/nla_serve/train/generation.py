"""Batched generation loops: AV explanations (RL, eval) and the target's chat transcripts.

``generate``: the verbalizer recipe for many vectors at once. Same prompt, same injection
(``models.inject``: the marker row replaced by ``injection_row``), same stops (``</explanation>``
in the decoded text, or any EOS id) as ``nla.verbalizer``; all prompts have one length, so the
batch needs no padding. ``generate_ids``: plain prompts of different lengths, left-padded with
explicit positions. Greedy at temperature 0, else sampling from ``softmax(logits / temperature)``
(top-p optional) with a seeded generator. Hand-written KV-cache loops: on a 2-core CPU they run
several times faster per step than ``model.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nla_serve.nla.verbalizer import CLOSE, parse_explanation
from nla_serve.train.models import inject


@dataclass
class Sample:
    token_ids: list[int]  # generated ids, through the stop token or stop string
    text: str  # decoded, special tokens skipped, cut after the stop string
    body: str
    closed: bool


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[int], at: int, scale: float, vectors: torch.Tensor, *,
             max_new_tokens: int, eos_ids: set[int] | tuple[int, ...], temperature: float = 0.0,
             generator: torch.Generator | None = None, batch_size: int = 32, stop: str = CLOSE) -> list[Sample]:
    """vectors: [N, d] -> N samples, in order. ``stop``: the whole closing tag for training's
    samples (their log-probabilities are taken over whole answers); evaluation passes what the
    server stops at (``verbalizer.STOP``) so that it counts the server's tokens."""
    out: list[Sample] = []
    for i in range(0, len(vectors), batch_size):
        out += _generate(model, tokenizer, prompt_ids, at, scale, vectors[i:i + batch_size],
                         max_new_tokens=max_new_tokens, eos_ids=set(eos_ids), temperature=temperature,
                         generator=generator, stop=stop)
    return out


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """logits: [B, V] float32 -> next ids [B]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, dim=-1)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: set[int], pad_id: int,
                 temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> list[list[int]]:
    """Prompts of any lengths -> generated ids per prompt, through the first EOS."""
    dev = next(model.parameters()).device
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T], left-padded
    mask = torch.zeros((B, T), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, T - len(p):] = torch.tensor(p)
        mask[r, T - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(dim=1) - 1).clamp_min(0)  # [B, T]
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    past, logits, last = out.past_key_values, out.logits[:, -1].float(), pos[:, -1]
    gen: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_new_tokens):
        nxt = pick(logits, temperature, top_p, generator)
        for r, t in enumerate(nxt.tolist()):
            if not done[r]:
                gen[r].append(t)
                done[r] = t in eos_ids
        if all(done):
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], past_key_values=past,
                    use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
    return gen


def _generate(model, tokenizer, prompt_ids, at, scale, vectors, *, max_new_tokens, eos_ids, temperature, generator,
              stop):
    dev = next(model.parameters()).device
    B = len(vectors)
    ids = torch.tensor([prompt_ids] * B, device=dev)  # [B, P]
    out = model(inputs_embeds=inject(model, ids, at, vectors, scale), use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1].float()  # [B, V]
    gen: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_new_tokens):
        nxt = pick(logits, temperature, 1.0, generator)
        for r, t in enumerate(nxt.tolist()):
            if done[r]:
                continue
            gen[r].append(t)
            if t in eos_ids or stop in tokenizer.decode(gen[r][-12:], skip_special_tokens=True):
                done[r] = True
        if all(done):
            break
        out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
    samples = []
    for g in gen:
        text = tokenizer.decode(g, skip_special_tokens=True)
        at_close = text.find(stop)
        if at_close >= 0:
            text = text[:at_close + len(stop)]
        body, closed = parse_explanation(text)
        samples.append(Sample(g, text, body, closed))
    return samples
