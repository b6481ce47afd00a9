"""(explanation, vector) -> mse, cos, fve with the AR.

The AR is the target architecture truncated to K+1 blocks with the final norm replaced by the
identity and a linear value head on the last token's output. Its prompt is the AR template filled
with the explanation body, tokenized as a raw string *with* special tokens (BOS matters). Batches
are right-padded and read at each row's last real token.

Scoring: both the prediction and the original are normalised to norm ``mse_scale`` (sqrt(d)), so
``mse = mean((p - g)^2) = 2 (1 - cos)``, and ``fve = 1 - mse / baseline`` when a baseline is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nla_serve.nla.checkpoint import ARCheckpoint

if TYPE_CHECKING:
    import torch


def load_truncated_base(folder: str, *, dtype: "torch.dtype", num_layers: int | None = None) -> "torch.nn.Module":
    """The AR's body, for serving and for training alike: the architecture's base model (no
    lm_head) with the final norm replaced by the identity. ``num_layers`` truncates a full target
    to blocks 0..K while training (a released AR folder is already truncated)."""
    import torch
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    cfg = AutoConfig.from_pretrained(folder)
    if num_layers is not None:
        cfg.get_text_config().num_hidden_layers = num_layers
    # The AR ships no lm_head and no final norm, so transformers reports them as newly initialised
    # (and, for a target being truncated, the deeper blocks as unused): expected, so kept quiet.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModel.from_pretrained(folder, config=cfg, dtype=dtype)
    finally:
        hf_logging.set_verbosity(level)
    for attr in ("norm", "final_layernorm", "ln_f"):
        if hasattr(model, attr):
            setattr(model, attr, torch.nn.Identity())
            break
    return model


def ar_batch(tokenizer, template: str, bodies: list[str]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The AR's inputs, for serving and training alike: the template filled with each body,
    tokenized as a raw string with special tokens (BOS matters), right-padded. -> ids, mask: [B, T]."""
    import torch

    enc = [tokenizer(template.format(explanation=b), add_special_tokens=True)["input_ids"] for b in bodies]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    T = max(len(e) for e in enc)
    ids = torch.full((len(enc), T), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), T), dtype=torch.long)
    for r, e in enumerate(enc):
        ids[r, :len(e)] = torch.tensor(e)
        mask[r, :len(e)] = 1
    return ids, mask


@dataclass
class Score:
    mse: float
    cos: float
    fve: float | None


def score_vectors(pred: "torch.Tensor", gold: "torch.Tensor", mse_scale: float,
                  baseline: float | None) -> list[Score]:
    """pred, gold: [N, d] -> N scores (fp32)."""
    import torch

    p = pred.float()
    g = gold.float()
    p = p * (mse_scale / p.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    g = g * (mse_scale / g.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    mse = ((p - g) ** 2).mean(dim=-1)
    cos = torch.nn.functional.cosine_similarity(p, g, dim=-1)
    return [Score(float(m), float(c), (1.0 - float(m) / baseline) if baseline else None)
            for m, c in zip(mse, cos)]


class Reconstructor:
    """Loads the AR folder onto ``device`` and scores explanations in batches."""

    def __init__(self, checkpoint: ARCheckpoint, *, device: str = "cpu", dtype: str = "auto",
                 batch_size: int = 32):
        self.ckpt = checkpoint
        self.device_name = device
        self.dtype_name = dtype
        self.batch_size = batch_size
        self.model = None

    def load(self) -> None:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        from nla_serve.model_folder import resolve_device, resolve_dtype

        path = str(self.ckpt.path)
        self.device = resolve_device(self.device_name)
        self.dtype = resolve_dtype(self.dtype_name, path)  # "auto": the checkpoint's own
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = load_truncated_base(path, dtype=self.dtype).to(self.device).eval()
        head = load_file(str(self.ckpt.path / "value_head.safetensors"))
        self.head_w = head["weight"].float().to(self.device)  # [d, d]
        self.head_b = head["bias"].float().to(self.device) if "bias" in head else None

    def reconstruct(self, texts: list[str]) -> "torch.Tensor":
        """texts: N explanation bodies -> [N, d] float32 predictions (cpu)."""
        import torch

        if self.model is None:
            self.load()
        outs = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                ids, mask = ar_batch(self.tokenizer, self.ckpt.template, texts[i:i + self.batch_size])  # [B, T]
                h = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                               use_cache=False).last_hidden_state  # [B, T, d]
                last = mask.sum(dim=1) - 1  # [B]
                h_last = h[torch.arange(ids.shape[0]), last.to(self.device)].float()  # [B, d]
                pred = h_last @ self.head_w.T
                if self.head_b is not None:
                    pred = pred + self.head_b
                outs.append(pred.cpu())
        return torch.cat(outs)

    def score(self, texts: list[str], vectors: "torch.Tensor", baseline: float | None) -> list[Score]:
        return score_vectors(self.reconstruct(texts), vectors, self.ckpt.mse_scale, baseline)
