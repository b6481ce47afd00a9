"""Typed, frozen settings. Only this module (and the CLI that fills it) reads the environment.

``EngineSettings`` describes one engine instance (the target with capture, or the verbalizer with
prompt embeddings); engines get exactly their slice and nothing else.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EngineKind = Literal["vllm", "transformers"]


class EngineSettings(BaseModel):
    """One engine.

    Example::

        EngineSettings(model="/models/smollm2", kind="vllm", capture_layer=20)

    ``capture_layer`` is the NLA layer K (output of decoder block K, HF ``hidden_states[K+1]``);
    ``None`` disables capture. ``enable_prompt_embeds`` is needed by the verbalizer engine.
    ``memory_fraction`` is the share of accelerator memory for this engine on GPU;
    ``kv_cache_gib`` bounds the KV cache on CPU. ``max_num_batched_tokens`` is the per-step token
    budget (small values force chunked prefill).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    kind: EngineKind = "vllm"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N" (transformers engine)
    capture_layer: int | None = None
    enable_prompt_embeds: bool = False
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    memory_fraction: float = Field(default=0.45, gt=0, le=1)
    kv_cache_gib: float = Field(default=1.0, gt=0)
    enforce_eager: bool = False
    seed: int = 0
