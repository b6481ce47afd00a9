"""Plain data that crosses module boundaries: prompts, sampling options, step outputs, explanations.

No torch import at module level: tensors appear only as annotations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from nla_serve.steering.intervention import Intervention, PositionRule  # noqa: F401 - engines take it from here

if TYPE_CHECKING:
    import torch

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS
FinishReason = Literal["stop", "length", "abort"]
ExplanationStatus = Literal["ok", "truncated", "skipped", "failed", "unavailable"]


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on what may be generated (vLLM's structured outputs): a JSON schema (as JSON
    text, so that options stay hashable), any JSON object, a regular expression, one of a few
    strings, or an EBNF grammar. (Whether JSON may hold optional whitespace is the engine's
    setting, ``disable_any_whitespace``.)"""

    kind: Literal["json", "json_object", "regex", "choice", "grammar"]
    value: str | tuple[str, ...] | None = None


@dataclass(frozen=True)
class SamplingOptions:
    """What to generate. ``temperature == 0`` means greedy.

    ``stop`` strings are matched on the decoded text; ``stop_token_ids`` end generation on those ids
    (in addition to the model's EOS unless ``ignore_eos``). ``include_stop_str_in_output`` keeps a
    matched stop string in the returned text (the verbalizer uses it to tell a closed explanation
    from a truncated one).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob plus the top k
    prompt_logprobs: int | None = None  # None: off; k >= 0: each prompt token's logprob and the top k
    # vLLM's semantics: presence/frequency penalties count generated tokens only, the repetition
    # penalty prompt and generated tokens; logit_bias is added before them; min_p scales with the
    # top token's probability (sampling only); min_tokens holds back EOS, stop ids and stop strings.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0
    min_tokens: int = 0
    structured: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        """Temperatures this small sample greedily, as in vLLM (dividing logits by 1e-300 would
        overflow them to inf and the distribution to NaN)."""
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class Prompt:
    """Token ids for one request, optionally with one embedding row replaced (the NLA injection).

    ``inject_row`` is the exact vector to place at position ``inject_at`` in the model's input
    embeddings ([d_model], already scaled; the engine casts it once to its dtype). It bypasses any
    architecture embedding scale (Gemma's sqrt(hidden)), as the NLA recipe requires.
    """

    token_ids: list[int]
    inject_at: int | None = None
    inject_row: "torch.Tensor | None" = None  # [d_model]

    def __post_init__(self) -> None:
        if (self.inject_at is None) != (self.inject_row is None):
            raise ValueError("inject_at and inject_row go together")
        if self.inject_at is not None and not 0 <= self.inject_at < len(self.token_ids):
            raise ValueError(f"inject_at={self.inject_at} outside a prompt of {len(self.token_ids)} tokens")


@dataclass
class CapturedRows:
    """Layer-K residual rows for consecutive positions ``start .. start + len(rows) - 1``.

    Position p counts over prompt + completion (0 = first prompt token). The row at p is the output
    of decoder block K when token p was fed, i.e. Hugging Face ``hidden_states[K + 1][p]``.
    """

    start: int
    rows: "torch.Tensor"  # [n_rows, d_model], float32, cpu
    layer: int | None = None  # K: the block whose output these rows are (None: the engine did not say)

    @property
    def end(self) -> int:
        return self.start + int(self.rows.shape[0])


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter of the target, served under its own model name (``--lora-modules``).
    ``int_id`` is the engine's handle for it (vLLM's ``lora_int_id``, from 1)."""

    name: str
    int_id: int
    path: str


@dataclass
class TokenLogprob:
    """Log-probability of a sampled token under the model's raw distribution, and the top k."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class StepOutput:
    """One update for one choice of a request.

    ``token_ids``/``text`` are the delta since the last update of that choice. ``captured`` carries
    any activation rows that became available with this update: the reference engine delivers them
    step by step, the vLLM engine one engine step behind the tokens (the rest with the final update).
    """

    index: int
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    captured: CapturedRows | None = None
    num_prompt_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked for
    # With ``prompt_logprobs``, on a choice's first update: entry p (0 .. P-2) is the distribution at
    # prompt position p, which predicts token p+1 (``token_id`` is that prompt token, ``top`` the top k)
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    """A whole finished generation of one choice (what the verbalizer needs)."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    error: str | None = None  # why this one prompt could not be generated (the others still were)


@dataclass
class Explanation:
    """One explained vector. ``status`` says whether ``text`` can be trusted and why not."""

    status: ExplanationStatus
    text: str | None = None
    reason: str | None = None
    truncated: bool = False
    tokens: int = 0  # verbalizer tokens generated
    mse: float | None = None
    cos: float | None = None
    fve: float | None = None
    fve_reason: str | None = None  # why fve is null when mse is known
    raw: str | None = None  # the verbalizer's full output, tags included
    claims: list[dict] | None = None  # [{text, support, verdict}] when asked (explain/claims.py)
    extra: dict = field(default_factory=dict)


@dataclass
class EngineStats:
    """What an engine knows about its own load, for /metrics (filled by engines that can tell)."""

    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    num_running: int = 0
    num_waiting: int = 0
    capture_dir_bytes: int = 0  # captured activations not yet taken by their request
    queue_times: list[float] = field(default_factory=list)  # seconds queued, per finished request, not yet exported
    preemptions: int = 0  # requests preempted (KV cache full), in all
    prefix_cache_hits: int = 0  # prompt tokens served from the prefix cache, in all
    preemptions_unexported: int = 0  # ... of which /metrics has not counted yet
