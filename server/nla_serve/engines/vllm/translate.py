"""Our request in vLLM's terms and vLLM's output in ours: ``SamplingOptions`` -> ``SamplingParams``,
a ``Prompt`` (with or without an injected embedding row) -> vLLM's prompt dict, vLLM's logprobs and
finish reasons -> ours.

Pure translation with no engine state, kept apart from ``engine`` so that the request loop there
reads as the life of one request. One refusal lives here because it is about what vLLM can take:
on CPU, a per-request ``seed`` with temperature > 0 crashes the whole engine as soon as that
request's prompt is split by chunked prefill (vLLM rewinds a CPU ``torch.Generator`` offset, which
CPU generators do not support). Whether a prompt is split depends on what else is in the batch, so
such requests are refused with a ``ClientError`` on CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nla_serve.engines.base import check_prompt
from nla_serve.engines.vllm.capture import protocol
from nla_serve.engines.vllm.errors import map_vllm_error
from nla_serve.errors import ClientError
from nla_serve.types import Adapter, FinishReason, Prompt, SamplingOptions, StructuredOutput, TokenLogprob

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


def structured_outputs(spec: StructuredOutput | None):
    """vLLM's ``StructuredOutputsParams`` for ours (None for none)."""
    if spec is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    value: Any = True if spec.kind == "json_object" else spec.value
    if spec.kind == "choice":
        value = list(spec.value or ())
    return StructuredOutputsParams(**{spec.kind: value})


def sampling_params(o: SamplingOptions, prompt: Prompt, capture: bool, *, max_model_len: int, on_cpu: bool,
                    speculative: bool = False, steering: dict | None = None):
    """vLLM's ``SamplingParams`` for one request (DELTA outputs; asking for its rows when
    ``capture``; carrying its steering, ``Intervention.as_wire``), after the checks every engine makes."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    check_prompt(prompt, o, max_model_len)
    if speculative:  # vLLM refuses these whenever a speculative config exists (our capture draft is one)
        for name, used in (("min_p", o.min_p > 0), ("logit_bias", bool(o.logit_bias))):
            if used:
                raise ClientError(f"{name} is not supported with --capture-method speculative (vLLM refuses it "
                                  "beside a speculative config); use the embedded capture method", param=name)
    if on_cpu and o.seed is not None and not o.greedy:
        raise ClientError(
            "seed with temperature > 0 is not supported by the vLLM CPU engine (vLLM crashes "
            "when such a prompt is split by chunked prefill); drop seed or use temperature 0",
            param="seed",
        )
    try:
        return SamplingParams(
            n=o.n,
            max_tokens=o.max_tokens,
            temperature=o.temperature,
            top_p=o.top_p,
            top_k=o.top_k if o.top_k > 0 else 0,
            seed=o.seed,
            stop=list(o.stop) or None,
            stop_token_ids=list(o.stop_token_ids) or None,
            ignore_eos=o.ignore_eos,
            include_stop_str_in_output=o.include_stop_str_in_output,
            logprobs=o.logprobs,
            prompt_logprobs=o.prompt_logprobs,
            presence_penalty=o.presence_penalty,
            frequency_penalty=o.frequency_penalty,
            repetition_penalty=o.repetition_penalty,
            logit_bias=dict(o.logit_bias) or None,
            min_p=o.min_p,
            min_tokens=o.min_tokens,
            structured_outputs=structured_outputs(o.structured),
            output_kind=RequestOutputKind.DELTA,
            extra_args=protocol.capture_extra_args(capture, steering),
        )
    except Exception as e:  # vLLM validates ranges (temperature < 0, top_p > 1, n > 1 when greedy, ...)
        mapped = map_vllm_error(e)
        if isinstance(mapped, ClientError):
            raise mapped from e
        raise


def lora_request(adapter: Adapter | None):
    """vLLM's ``LoRARequest`` for an adapter (None for the base model)."""
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter.name, adapter.int_id, adapter.path)


def engine_prompt(prompt: Prompt, *, enable_prompt_embeds: bool, hidden_size: int, dtype: Any,
                  cache_salt: str | None = None) -> dict[str, Any]:
    """vLLM's prompt dict: token ids, or (with ``inject_at``) mixed-mode prompt embeddings. A
    ``cache_salt`` (a steered request's fingerprint) keeps its prefix-cache blocks apart."""
    salt = {} if cache_salt is None else {"cache_salt": cache_salt}
    if prompt.inject_at is None:
        return {"prompt_token_ids": list(prompt.token_ids), **salt}
    if not enable_prompt_embeds:
        raise ClientError(
            "this engine was started without enable_prompt_embeds, so it cannot take a prompt "
            "with an injected embedding row; start it with enable_prompt_embeds=True"
        )
    import torch

    row = prompt.inject_row
    if tuple(row.shape) != (hidden_size,):
        raise ClientError(f"inject_row has shape {tuple(row.shape)}; expected ({hidden_size},)")
    # Mixed mode: full-length embeddings, zeros where the engine embeds the token itself.
    embeds = torch.zeros(len(prompt.token_ids), hidden_size, dtype=dtype)  # [P, d]
    embeds[prompt.inject_at] = row.detach().to("cpu", torch.float32).to(dtype)
    mask = [True] * len(prompt.token_ids)
    mask[prompt.inject_at] = False
    return {
        "prompt_embeds": embeds,
        "prompt_token_ids": list(prompt.token_ids),
        "prompt_is_token_ids": mask,
        **salt,
    }


def held_back_text(tokenizer: "PreTrainedTokenizerBase", token_ids: list[int], text: str) -> str:
    """What vLLM's incremental detokenizer still holds at the end: the U+FFFD of an incomplete
    UTF-8 sequence, which the reference engine (a plain ``decode``) does return."""
    full = tokenizer.decode(token_ids, skip_special_tokens=True)
    rest = full[len(text):] if full.startswith(text) else ""
    return rest if rest and not rest.strip("\ufffd") else ""


def logprobs(token_ids: list[int], positions, k: int | None) -> list[TokenLogprob] | None:
    """vLLM's per-position {token id: Logprob(logprob, rank)} -> ours (raw logprobs, top k by rank)."""
    if k is None or positions is None:
        return None
    out = []
    for token, entries in zip(token_ids, positions):
        entries = entries or {}
        chosen = entries.get(token)
        top = sorted(
            ((tid, lp) for tid, lp in entries.items() if lp.rank is not None and lp.rank <= k),
            key=lambda item: item[1].rank,
        )
        out.append(TokenLogprob(token, float(chosen.logprob) if chosen else float("nan"),
                                [(int(tid), float(lp.logprob)) for tid, lp in top]))
    return out


def prompt_logprobs(prompt_ids: list[int], positions, k: int | None) -> list[TokenLogprob] | None:
    """vLLM's ``prompt_logprobs`` (entry i: prompt token i under the distribution at i-1, None for
    i = 0) -> ours (entry p: the distribution at p, predicting token p+1), the top k by rank."""
    if k is None or positions is None:
        return None
    return logprobs(prompt_ids[1:], list(positions)[1:], k)

