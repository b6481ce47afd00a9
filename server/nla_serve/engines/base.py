"""The engine interface every implementation follows, and the helpers they share.

``TargetEngine`` is what the rest of nla-serve talks to; ``transformers_engine`` (the reference)
and ``vllm/`` (production) implement it and import from here, never from the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, AsyncIterator, Protocol, runtime_checkable

from nla_serve.engine_config import EngineSettings
from nla_serve.types import Adapter, Completion, Intervention, Prompt, SamplingOptions, StepOutput

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@runtime_checkable
class TargetEngine(Protocol):
    settings: EngineSettings
    tokenizer: "PreTrainedTokenizerBase"
    hidden_size: int
    num_layers: int
    max_model_len: int
    dtype: "torch.dtype"  # what the weights really run in (known after start)
    constrains_decoding: bool  # whether SamplingOptions.structured is honoured (else refused)

    async def start(self) -> None: ...

    @property
    def alive(self) -> bool:
        """False once the engine cannot serve any more (its processes died); see supervisor.py."""
        ...

    def generate(
        self, prompt: Prompt, options: SamplingOptions, request_id: str, capture: bool = True,
        intervention: Intervention | None = None, adapter: Adapter | None = None,
    ) -> AsyncIterator[StepOutput]:
        """Yield token deltas per choice as they come; the final update of each choice has
        ``finished=True``. When ``capture`` and the engine has a ``capture_layer``, the updates of
        each choice together carry rows for positions ``0 .. P+G-2`` (every token fed through the
        model; the last sampled token never is), each piece saying its ``layer``.
        ``intervention`` (steering) is applied or refused with a ``ClientError``, never ignored;
        likewise ``adapter`` (a LoRA adapter of the target)."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def shutdown(self) -> None: ...

    def in_flight(self) -> dict[str, int]:
        """Sizes of every per-request structure the engine keeps (all 0 when idle)."""
        ...


async def generate_all(
    engine: TargetEngine, prompts: list[Prompt], options: SamplingOptions, request_id: str
) -> list[Completion]:
    """Run many single-choice prompts concurrently (the engine batches them) and collect them. A
    prompt the engine refuses or cannot place (``ClientError``, ``UnavailableError``: e.g. every
    backend of a remote verbalizer is down) comes back with ``error`` set; the others go on."""
    import asyncio

    from nla_serve.errors import ClientError, UnavailableError

    async def one(i: int, prompt: Prompt) -> Completion:
        ids: list[int] = []
        text: list[str] = []
        reason = None
        try:
            async for out in engine.generate(prompt, options, f"{request_id}-{i}", capture=False):
                ids.extend(out.token_ids)
                text.append(out.text)
                if out.finished:
                    reason = out.finish_reason
        except (ClientError, UnavailableError) as e:
            return Completion(token_ids=ids, text="".join(text), finish_reason=None, error=e.message)
        return Completion(token_ids=ids, text="".join(text), finish_reason=reason)

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def refuse_adapter(adapter: Adapter | None, engine: str) -> None:
    """The check of an engine that serves the base model only."""
    if adapter is not None:
        from nla_serve.errors import ClientError

        raise ClientError(f"the {engine} engine serves the base model only, not the LoRA adapter "
                          f"'{adapter.name}'", param="model")


def refuse_intervention(intervention: Intervention | None, engine: str) -> None:
    """The check of an engine that cannot steer yet: a clear 400 rather than a silent no-op."""
    if intervention is not None:
        from nla_serve.errors import ClientError

        raise ClientError(f"the {engine} engine cannot apply a steering intervention", param="steering")


def check_intervention(intervention: Intervention | None, *, hidden_size: int, num_layers: int,
                       capture_layer: int | None) -> None:
    """The checks of an engine that steers: at its NLA layer, a vector as wide as the model, and a
    block after it (the vector is added at block K+1's input, see steering/intervention.py)."""
    if intervention is None:
        return
    from nla_serve.errors import ClientError

    if capture_layer is None or intervention.layer != capture_layer:
        raise ClientError(f"steering is applied at the NLA layer ({capture_layer}); this request asks for layer "
                          f"{intervention.layer}", param="steering")
    if intervention.layer + 1 >= num_layers:
        raise ClientError(f"steering after the last block ({intervention.layer}) is not supported", param="steering")
    for d in intervention.directions:
        if len(d) != hidden_size:
            raise ClientError(f"a steering vector has {len(d)} numbers; this model's residual stream has "
                              f"{hidden_size}", param="steering")


def check_prompt(prompt: Prompt, options: SamplingOptions, max_model_len: int) -> None:
    """The checks every engine makes before generating: a prompt, and room for max_tokens."""
    from nla_serve.errors import ClientError, ContextLengthError

    if not prompt.token_ids:
        raise ClientError("the prompt is empty", param="prompt")
    if options.n > 1 and options.greedy:
        # vLLM refuses it too: greedy sampling would return n identical choices
        raise ClientError(f"n is {options.n}, but greedy sampling (temperature 0) gives n identical choices; "
                          "use n: 1 or a temperature above 0", param="n")
    if len(prompt.token_ids) + options.max_tokens > max_model_len:
        raise ContextLengthError(
            f"prompt ({len(prompt.token_ids)} tokens) + max_tokens ({options.max_tokens}) exceeds "
            f"the model's context of {max_model_len} tokens",
            param="max_tokens",
        )


__all__ = ["TargetEngine", "check_intervention", "check_prompt", "generate_all", "refuse_adapter", "refuse_intervention"]
