"""What every training stage shares: deterministic batches, the LR schedule, resumable state, the
loss log and the compute context.

Resuming is exact up to floating point: batch ``s`` is a pure function of (seed, step), RL draws
its samples from a generator seeded by (seed, step), and the state file holds every trainable
tensor, the optimizer state and the step. States are written every ``save_every`` steps and at the
end, atomically (write aside, rename), so a killed run loses at most ``save_every`` steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Indices of batch ``step`` in an endless stream of seeded epoch permutations of range(n)."""
    out: list[int] = []
    start = step * batch
    while len(out) < batch:
        epoch, off = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[off:off + batch - len(out)].tolist())
    return out


def lr_at(step: int, total: int, base: float, warmup: float = 0.05, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to ``floor * base``."""
    w = max(1, int(total * warmup))
    if step < w:
        return base * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def set_lr(opt: torch.optim.Optimizer, step: int, total: int) -> None:
    for g in opt.param_groups:
        g["lr"] = lr_at(step, total, g["base_lr"])


def optimizer(groups: list[tuple[list[nn.Parameter], float]]) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([{"params": ps, "lr": lr, "base_lr": lr} for ps, lr in groups if ps],
                            weight_decay=0.0, betas=(0.9, 0.99))
    return opt


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"saved state lacks {len(missing)} trainable tensors (e.g. {missing[0]}); "
                         "was it made with another --lora-rank?")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save_state(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


class LossLog:
    """Appends one JSON line per step to ``losses.jsonl``: stage, step, wall time and metrics."""

    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.time()

    def write(self, stage: str, step: int, **metrics: float) -> None:
        row = {"stage": stage, "step": step, "t": round(time.time() - self.t0, 2)}
        row.update({k: round(float(v), 6) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read(self, stage: str) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines()]
        by_step = {r["step"]: r for r in rows if r["stage"] == stage}  # a resumed run redoes a few steps
        return [by_step[s] for s in sorted(by_step)]


@contextlib.contextmanager
def compute(device: str, dtype: str) -> Iterator[None]:
    """Autocast matmuls to ``dtype`` (weights stay fp32); a no-op for float32."""
    if dtype == "float32":
        yield
        return
    with torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype)):
        yield
