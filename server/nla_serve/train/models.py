"""The two trainable models and their LoRA layers.

- ``build_av``: a copy of the target (same architecture and weights) that learns to verbalize.
- ``build_ar``: the target truncated to K+1 decoder blocks, final norm replaced by the identity
  (the released AR has none), plus a [d, d] value head (with bias) read at the last real token.

Both train either all weights (``rank=0``) or LoRA adapters over the target's own frozen weights
(``rank>0``; every linear layer inside the decoder blocks, never the embeddings or lm_head, so a
tied lm_head stays tied). ``LoRALinear`` follows PEFT's conventions (A: [r, in] Kaiming-uniform,
B: [out, r] zeros, ``scaling = alpha / r``), and ``adapter_state`` names tensors exactly as PEFT
saves them, so exported adapters load with PEFT too; ``merged_state`` folds them in with the
loader's own ``nla.lora.lora_delta``.

The AV forward used in training and RL injects the vector exactly as at inference: the canonical
prompt's embeddings, with the marker row *replaced* by ``injection_row(v, scale)`` (fp32, cast
once to the model dtype, no architecture embedding scale).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from nla_serve.nla.lora import PEFT_PREFIX, lora_delta
from nla_serve.nla.reconstructor import load_truncated_base
from nla_serve.nla.verbalizer import injection_row


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False  # inside ``lora_merged``: base.weight already holds W + dW

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return self.base(x) + (x @ self.lora_A.T.to(x.dtype) @ self.lora_B.T.to(x.dtype)) * self.scaling


@contextlib.contextmanager
def lora_merged(model: nn.Module) -> Iterator[None]:
    """Fold the adapters into the base weights for the duration (generation: one matmul per layer
    instead of three), then put the original tensors back untouched."""
    mods = lora_modules(model)
    saved = {}
    with torch.no_grad():
        for name, m in mods.items():
            w = m.base.weight.data
            saved[name] = w
            m.base.weight.data = (w.float() + lora_delta(m.lora_A, m.lora_B, m.scaling)).to(w.dtype)
            m.merged = True
    try:
        yield
    finally:
        for name, m in mods.items():
            m.base.weight.data = saved[name]
            m.merged = False


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] | None = None) -> list[str]:
    """Wrap every nn.Linear inside the decoder blocks (or those whose last name is in ``targets``);
    freeze everything else. -> module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"
             and (targets is None or n.rsplit(".", 1)[-1] in targets)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """PEFT key naming: ``base_model.model.<module>.lora_A.weight`` etc."""
    out = {}
    for name, m in lora_modules(model).items():
        key = PEFT_PREFIX + prefix + name
        out[f"{key}.lora_A.weight"] = m.lora_A.detach().clone()
        out[f"{key}.lora_B.weight"] = m.lora_B.detach().clone()
    return out


def merged_state(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The full state dict with every adapter folded in (HF naming, ``prefix`` prepended)."""
    state = {}
    loras = lora_modules(model)
    for name, t in model.state_dict().items():
        mod, _, leaf = name.rpartition(".")
        if name.endswith((".lora_A", ".lora_B")):
            continue
        if mod.endswith(".base") and mod[: -len(".base")] in loras:
            m = loras[mod[: -len(".base")]]
            name = f"{mod[: -len('.base')]}.{leaf}"
            if leaf == "weight":
                t = (t.float() + lora_delta(m.lora_A.detach(), m.lora_B.detach(), m.scaling)).to(t.dtype)
        state[prefix + name] = t.detach().clone()
    return state


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# -- AV ----------------------------------------------------------------------------------------


def build_av(target: str, *, rank: int, alpha: float, device: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    if rank > 0:
        add_lora(model, rank, alpha)
    return model.to(device)


def inject(model: nn.Module, ids: torch.Tensor, at: int, vectors: torch.Tensor, scale: float) -> torch.Tensor:
    """ids: [B, T], vectors: [B, d] -> inputs_embeds [B, T, d] with row ``at`` replaced."""
    emb = model.get_input_embeddings()(ids)  # [B, T, d], any architecture scale included
    rows = torch.stack([injection_row(v, scale) for v in vectors]).to(emb.device, emb.dtype)  # [B, d]
    emb = emb.clone()
    emb[:, at] = rows
    return emb


def av_logprobs(model: nn.Module, prompt_ids: list[int], at: int, scale: float, vectors: torch.Tensor,
                targets: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of ``targets`` after the injected prompt.
    -> (logp [B, L] of each target token, mask [B, L])."""
    dev = next(model.parameters()).device
    P, L = len(prompt_ids), max(len(t) for t in targets)
    ids = torch.full((len(targets), P + L), pad_id, dtype=torch.long)  # [B, P+L], right-padded
    mask = torch.zeros((len(targets), P + L), dtype=torch.long)
    ids[:, :P] = torch.tensor(prompt_ids)
    mask[:, :P] = 1
    for r, t in enumerate(targets):
        ids[r, P:P + len(t)] = torch.tensor(t)
        mask[r, P:P + len(t)] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    emb = inject(model, ids, at, vectors, scale)
    hidden = model.base_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state  # [B, P+L, d]
    logits = model.get_output_embeddings()(hidden[:, P - 1:-1]).float()  # [B, L, V], predicts P..P+L-1
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, P:, None])[..., 0]  # [B, L]
    return logp, mask[:, P:].float()


# -- AR ----------------------------------------------------------------------------------------


class ARModel(nn.Module):
    """Truncated target (blocks 0..K, no final norm) + value head on the last real token.

    The head starts as ``0.1 * I`` plus a bias equal to the mean training vector, so the untrained
    AR already predicts the best constant (FVE about 0) and the weight learns the deviations. The
    released format allows the optional ``bias`` beside ``weight``."""

    def __init__(self, base: nn.Module, d: int):
        super().__init__()
        self.base = base
        self.head = nn.Linear(d, d, bias=True)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(d))
            self.head.bias.zero_()

    def init_head(self, mean: torch.Tensor, weight_scale: float = 0.1) -> None:
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(self.head.weight.shape[0]) * weight_scale)
            self.head.bias.copy_(mean)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: [B, T] right-padded -> predictions [B, d] float32."""
        h = self.base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # [B, T, d]
        last = mask.sum(dim=1) - 1  # [B]
        return self.head(h[torch.arange(ids.shape[0], device=ids.device), last].float())


def build_ar(target: str, layer: int, *, rank: int, alpha: float, device: str) -> ARModel:
    from transformers import AutoConfig

    base = load_truncated_base(target, dtype=torch.float32, num_layers=layer + 1)
    if rank > 0:
        add_lora(base, rank, alpha)
    model = ARModel(base, AutoConfig.from_pretrained(target).get_text_config().hidden_size)
    return model.to(device)


def normalized_mse(pred: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """pred, gold: [B, d] -> [B]: mse after scaling both to norm sqrt(d) (= 2 (1 - cos))."""
    d = pred.shape[-1]
    p = pred.float() * (math.sqrt(d) / pred.float().norm(dim=-1, keepdim=True).clamp_min(1e-12))
    g = gold.float() * (math.sqrt(d) / gold.float().norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return ((p - g) ** 2).mean(dim=-1)
