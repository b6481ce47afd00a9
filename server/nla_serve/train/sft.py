"""Supervised warm start of the pair on (vector, explanation target) examples.

- AR: read the target explanation (the body, tags stripped, through the AR template exactly as
  the runtime does), predict the vector; loss = mse of the sqrt(d)-normalised prediction and
  vector, the very quantity FVE is computed from (``2 (1 - cos)``).
- AV: the canonical prompt with the vector injected at the marker exactly as at inference, then
  teacher forcing on the target text (``<explanation>…</explanation>`` + end of turn); loss = mean
  token cross-entropy of the target only.

Both resume from their state file (see ``loop.py``) and log every step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from nla_serve.train.loop import (LossLog, batch_indices, compute, load_state, load_trainable, optimizer,
                                  save_state, set_lr, trainable_state)
from nla_serve.nla.reconstructor import ar_batch
from nla_serve.train.models import ARModel, av_logprobs, normalized_mse, trainable


def _resume(model, opt, path: Path) -> int:
    state = load_state(path)
    if state is None:
        return 0
    load_trainable(model, state["model"])
    if "optimizer" in state:
        opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def train_ar(model: ARModel, tokenizer, template: str, bodies: list[str], vectors: torch.Tensor, *, steps: int,
             batch: int, lr: float, seed: int, state_path: Path, log: LossLog, device: str, dtype: str = "float32",
             save_every: int = 50, progress: bool = True, stage: str = "ar") -> None:
    """Train the AR on ``bodies[i] -> vectors[i]`` for ``steps`` steps (resuming if a state exists)."""
    head = list(model.head.parameters())
    rest = [p for p in trainable(model) if all(p is not h for h in head)]
    opt = optimizer([(rest, lr), (head, lr)])
    start = _resume(model, opt, state_path)
    model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage, disable=not progress)
    for step in bar:
        idx = batch_indices(len(bodies), batch, step, seed)
        ids, mask = ar_batch(tokenizer, template, [bodies[i] for i in idx])
        set_lr(opt, step, steps)
        with compute(device, dtype):
            pred = model(ids.to(device), mask.to(device))
        loss = normalized_mse(pred, vectors[idx].to(device)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(trainable(model), 1.0)
        opt.step()
        log.write(stage, step, loss=loss.item(), cos=1 - loss.item() / 2, grad_norm=gn.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_state(state_path, step=step + 1, model=trainable_state(model), optimizer=opt.state_dict())
    model.eval()


def train_av(model, prompt_ids: list[int], at: int, scale: float, targets: list[list[int]], vectors: torch.Tensor,
             *, pad_id: int, steps: int, batch: int, lr: float, seed: int, state_path: Path, log: LossLog,
             device: str, dtype: str = "float32", save_every: int = 50, progress: bool = True,
             stage: str = "av") -> None:
    """Teach the AV to write ``targets[i]`` (token ids) for ``vectors[i]`` injected at ``at``."""
    opt = optimizer([(trainable(model), lr)])
    start = _resume(model, opt, state_path)
    model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage, disable=not progress)
    for step in bar:
        idx = batch_indices(len(targets), batch, step, seed + 1)
        set_lr(opt, step, steps)
        with compute(device, dtype):
            logp, mask = av_logprobs(model, prompt_ids, at, scale, vectors[idx], [targets[i] for i in idx], pad_id)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(trainable(model), 1.0)
        opt.step()
        log.write(stage, step, loss=loss.item(), grad_norm=gn.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_state(state_path, step=step + 1, model=trainable_state(model), optimizer=opt.state_dict())
    model.eval()
