"""GRPO-style reinforcement learning of the AV, with the AR's reconstruction error as reward.

Each step takes ``batch`` training vectors and samples ``group`` explanations for each from the
current AV (temperature ``temperature``, the inference recipe). The AR reconstructs each; the
reward is ``-mse`` of the sqrt(d)-normalised reconstruction (so ``2 (cos - 1)``), minus
``truncation_penalty`` for an explanation that never closed its tag. Advantages are the rewards
standardised within each vector's group (GRPO: no value network). The AV takes one on-policy
policy-gradient step on the token log-probs of its samples (the ratio is 1 on-policy, so no
clipping is needed; no KL term: the LR is small and the run short). The AR keeps training: one
supervised step on the same fresh (explanation, vector) pairs, so it follows the AV's drifting
style, as in the paper.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from nla_serve.train.generation import generate
from nla_serve.train.loop import (LossLog, batch_indices, compute, load_state, load_trainable, optimizer,
                                  save_state, set_lr, trainable_state)
from nla_serve.nla.reconstructor import ar_batch
from nla_serve.train.models import ARModel, av_logprobs, lora_merged, normalized_mse, trainable


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """rewards: [B*G] (groups contiguous) -> advantages [B*G], zero-mean unit-std per group."""
    r = rewards.view(-1, group)
    return ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True, unbiased=False) + 1e-4)).view(-1)


def train_rl(av, ar: ARModel, av_tok, ar_tok, prompt_ids: list[int], at: int, scale: float, ar_template: str,
             vectors: torch.Tensor, *, eos_ids: set[int], pad_id: int, steps: int, batch: int, group: int, lr: float,
             ar_lr: float, temperature: float, max_new_tokens: int, truncation_penalty: float, seed: int,
             state_path: Path, log: LossLog, device: str, dtype: str = "float32", save_every: int = 10,
             progress: bool = True, stage: str = "rl") -> None:
    av_opt = optimizer([(trainable(av), lr)])
    ar_opt = optimizer([(trainable(ar), ar_lr)])
    state = load_state(state_path)
    start = 0
    if state is not None:
        load_trainable(av, state["av"])
        load_trainable(ar, state["ar"])
        av_opt.load_state_dict(state["av_optimizer"])
        ar_opt.load_state_dict(state["ar_optimizer"])
        start = int(state["step"])
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage, disable=not progress)
    for step in bar:
        idx = batch_indices(len(vectors), batch, step, seed + 2)
        v = vectors[idx].repeat_interleave(group, dim=0).to(device)  # [B*G, d]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        av.eval()
        with compute(device, dtype), lora_merged(av):
            samples = generate(av, av_tok, prompt_ids, at, scale, v, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                               temperature=temperature, generator=gen, batch_size=len(v))
        ids, mask = ar_batch(ar_tok, ar_template, [s.body for s in samples])
        ids, mask = ids.to(device), mask.to(device)
        closed = torch.tensor([s.closed for s in samples], dtype=torch.float32, device=device)
        with torch.no_grad(), compute(device, dtype):
            mse = normalized_mse(ar(ids, mask), v)  # [B*G]
        reward = -mse - truncation_penalty * (1 - closed)
        adv = group_advantages(reward, group)

        av.train()
        set_lr(av_opt, step, steps)
        with compute(device, dtype):
            logp, tmask = av_logprobs(av, prompt_ids, at, scale, v, [s.token_ids or [pad_id] for s in samples], pad_id)
        pg_loss = -(adv[:, None] * logp * tmask).sum() / tmask.sum()
        av_opt.zero_grad(set_to_none=True)
        pg_loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable(av), 1.0)
        av_opt.step()

        ar.train()
        set_lr(ar_opt, step, steps)
        with compute(device, dtype):
            ar_loss = normalized_mse(ar(ids, mask), v).mean()
        ar_opt.zero_grad(set_to_none=True)
        ar_loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable(ar), 1.0)
        ar_opt.step()
        ar.eval()
        av.eval()

        log.write(stage, step, reward=reward.mean().item(), mse=mse.mean().item(), pg_loss=pg_loss.item(),
                  ar_loss=ar_loss.item(), closed=closed.mean().item(),
                  tokens=sum(len(s.token_ids) for s in samples) / len(samples))
        bar.set_postfix(reward=f"{reward.mean().item():.3f}", ar=f"{ar_loss.item():.3f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_state(state_path, step=step + 1, av=trainable_state(av), ar=trainable_state(ar),
                       av_optimizer=av_opt.state_dict(), ar_optimizer=ar_opt.state_dict())
