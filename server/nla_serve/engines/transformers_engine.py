"""The reference engine: plain Hugging Face transformers, one request at a time.

It defines what every engine must return. Generation is a hand-written loop (prefill, then one
token per step with the KV cache) so that the layer-K row of each fed position comes out of the
same forward pass that produced the next token:

    prefill  ids[0:P]      -> logits[P-1] -> token P      rows 0 .. P-1
    step     token P+i     -> logits      -> token P+i+1  row  P+i

The last sampled token is never fed, so a choice with G generated tokens has rows 0 .. P+G-2.
Rows are ``hidden_states[K+1]`` (output of decoder block K, before the next block's norm).

Requests are serialised by a lock (this is a reference, not a server engine); each forward runs
in a worker thread so the event loop keeps streaming, and aborts are honoured between steps.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator

from nla_serve.engine_config import EngineSettings
from nla_serve.engines import logits as logits_processing
from nla_serve.engines.base import check_intervention, check_prompt, refuse_adapter
from nla_serve.engines.logits import apply_min_p
from nla_serve.errors import ClientError, EngineError
from nla_serve.model_folder import eos_ids_of, resolve_device, resolve_dtype
from nla_serve.types import (Adapter, CapturedRows, FinishReason, Intervention, Prompt, SamplingOptions, StepOutput,
                             TokenLogprob)

if TYPE_CHECKING:
    import torch


def sample(logits: "torch.Tensor", options: SamplingOptions, generator) -> int:
    """logits: [vocab] float32 -> one token id."""
    import torch

    if options.greedy:
        return int(torch.argmax(logits))
    logits = apply_min_p(logits / options.temperature, options.min_p)
    if options.top_k and options.top_k > 0:
        kth = torch.topk(logits, min(options.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if options.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < options.top_p
        keep[0] = True  # the most likely token always stays (a top_p like 5e-324 is 0 in float32)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(0, order, keep)
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: "torch.Tensor", token: int, k: int) -> TokenLogprob:
    """Raw (pre-temperature) log-probabilities, as vLLM reports them by default."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, k) if k > 0 else None
    pairs = [(int(i), float(v)) for v, i in zip(top.values, top.indices)] if top is not None else []
    return TokenLogprob(token, float(logp[token]), pairs)


def prompt_logprobs(logits: "torch.Tensor", token_ids: list[int], k: int) -> list[TokenLogprob]:
    """logits: [P, V] of a prefill -> for p in 0 .. P-2, the distribution at p (which predicts
    token p+1): that token's raw logprob and the top k, as vLLM's ``prompt_logprobs`` reports them."""
    import torch

    logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # [P-1, V]
    nxt = torch.tensor(token_ids[1:], device=logp.device)  # [P-1]
    actual = logp.gather(1, nxt[:, None])[:, 0].tolist()
    top = torch.topk(logp, k, dim=-1)
    return [TokenLogprob(int(t), float(a), [(int(i), float(v)) for v, i in zip(vals, ids)])
            for t, a, vals, ids in zip(nxt.tolist(), actual, top.values.tolist(), top.indices.tolist())]


class TransformersEngine:
    """Reference ``TargetEngine`` over a Hugging Face causal LM."""

    constrains_decoding = False  # structured outputs need vLLM's grammar backends

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.model = None
        self.tokenizer = None
        self.hidden_size = self.num_layers = self.max_model_len = 0  # known after start()
        self.dtype = None  # torch dtype, known after start()
        self._lock = asyncio.Lock()
        self._running: set[str] = set()  # request ids inside generate()
        self._aborted: set[str] = set()  # subset of _running asked to stop
        self._steering = None  # SteeringHook on block K+1, once started with a capture layer

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        s = self.settings
        self.device = resolve_device(s.device)
        config = AutoConfig.from_pretrained(s.model)
        self.dtype = resolve_dtype(s.dtype, s.model)  # "auto": the checkpoint's own, as on vLLM
        self.tokenizer = AutoTokenizer.from_pretrained(s.model)
        self.model = AutoModelForCausalLM.from_pretrained(s.model, dtype=self.dtype).to(self.device).eval()
        text_cfg = getattr(config, "text_config", config)
        self.hidden_size = int(text_cfg.hidden_size)
        self.num_layers = int(text_cfg.num_hidden_layers)
        self.max_model_len = int(s.max_model_len or text_cfg.max_position_embeddings)
        self.eos_ids = eos_ids_of(s.model, self.tokenizer)
        if s.capture_layer is not None and not 0 <= s.capture_layer < self.num_layers:
            raise EngineError(
                f"capture_layer={s.capture_layer} is outside the model's {self.num_layers} blocks "
                f"(0..{self.num_layers - 1})"
            )
        if s.capture_layer is not None and s.capture_layer + 1 < self.num_layers:
            from nla_serve.steering.hf_hook import SteeringHook

            self._steering = SteeringHook(self.model, s.capture_layer)

    @property
    def alive(self) -> bool:
        return self.model is not None  # in-process: it lives and dies with the server

    async def abort(self, request_id: str) -> None:
        if request_id in self._running:  # an id that is not running has nothing to stop
            self._aborted.add(request_id)

    def in_flight(self) -> dict[str, int]:
        return {"requests": len(self._running), "aborts": len(self._aborted)}

    async def shutdown(self) -> None:
        self.model = None

    def _check(self, prompt: Prompt, options: SamplingOptions) -> None:
        if self.model is None:
            raise EngineError("engine is not started")
        check_prompt(prompt, options, self.max_model_len)
        if prompt.inject_row is not None and not self.settings.enable_prompt_embeds:
            raise ClientError("this engine does not accept prompt embeddings (enable_prompt_embeds is off)")
        if options.structured is not None:  # constrained decoding is vLLM's (xgrammar, guidance, outlines)
            raise ClientError("structured outputs (response_format, forced tool_choice, structured_outputs) need "
                              "the vLLM engine; the transformers reference engine does not constrain decoding",
                              param="structured_outputs")

    async def generate(
        self, prompt: Prompt, options: SamplingOptions, request_id: str, capture: bool = True,
        intervention: Intervention | None = None, adapter: Adapter | None = None,
    ) -> AsyncIterator[StepOutput]:
        refuse_adapter(adapter, "transformers")
        self._check(prompt, options)
        check_intervention(intervention, hidden_size=self.hidden_size, num_layers=self.num_layers,
                           capture_layer=self.settings.capture_layer)
        capture = capture and self.settings.capture_layer is not None
        self._running.add(request_id)
        try:
            async with self._lock:
                for index in range(options.n):
                    async for out in self._one_choice(prompt, options, request_id, index, capture, intervention):
                        yield out
                        if out.finish_reason == "abort":
                            return
        finally:
            self._running.discard(request_id)
            self._aborted.discard(request_id)

    async def _one_choice(self, prompt, options, request_id, index, capture,
                          intervention: Intervention | None) -> AsyncIterator[StepOutput]:
        import torch

        seed = options.seed + index if options.seed is not None else None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
        P = len(prompt.token_ids)
        past = None
        generated: list[int] = []
        sent_text = ""
        feed_pos = 0
        next_input = None
        while True:
            if request_id in self._aborted:
                yield StepOutput(index, [], "", True, "abort", num_prompt_tokens=P)
                return
            prompt_lps = None
            fed = range(P) if past is None else range(feed_pos, feed_pos + 1)
            u = intervention.rows(list(fed)) if intervention is not None else None
            if past is None:
                logits, row, past, prompt_lps = await asyncio.to_thread(self._prefill, prompt, capture,
                                                                        options.prompt_logprobs, u)
            else:
                logits, row, past = await asyncio.to_thread(self._decode, next_input, past, capture, u)
            captured = (CapturedRows(start=feed_pos, rows=row, layer=self.settings.capture_layer)
                        if row is not None else None)
            feed_pos = P if feed_pos == 0 else feed_pos + 1  # next position to be fed
            shaped = logits_processing.process(logits, options, prompt.token_ids, generated, self._stop_ids(options))
            token = sample(shaped, options, gen)
            lp = token_logprob(logits, token, options.logprobs) if options.logprobs is not None else None
            generated.append(token)
            reason, text = self._finish_state(generated, options, P)
            if reason is None and text.endswith("\ufffd"):
                delta = ""  # an incomplete UTF-8 sequence: wait for the bytes that finish it
            else:
                delta, sent_text = text[len(sent_text):], text
            yield StepOutput(index, [token], delta, reason is not None, reason, captured, P,
                             [lp] if lp is not None else None, prompt_lps)
            if reason is not None:
                return
            next_input = token

    def _stop_ids(self, options: SamplingOptions) -> list[int]:
        """The ids ``min_tokens`` holds back: EOS (unless ignored) and the request's stop ids."""
        return list(options.stop_token_ids) + ([] if options.ignore_eos else list(self.eos_ids))

    def _finish_state(self, generated: list[int], options: SamplingOptions, P: int) -> tuple[FinishReason | None, str]:
        token = generated[-1]
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if len(generated) < options.min_tokens:  # as vLLM: no stop of any kind before min_tokens
            reason = "length" if len(generated) >= options.max_tokens or P + len(generated) >= self.max_model_len else None
            return reason, text
        if not options.ignore_eos and token in self.eos_ids:
            return "stop", text
        if token in options.stop_token_ids:
            return "stop", text
        for stop in options.stop:
            at = text.find(stop)
            if at >= 0:
                return "stop", text[: at + len(stop)] if options.include_stop_str_in_output else text[:at]
        if len(generated) >= options.max_tokens or P + len(generated) >= self.max_model_len:
            return "length", text
        return None, text

    def _forward(self, past, capture, u, **inputs):
        """(logits at the last position [V], rows [T, d] or None, the cache, logits at every position [T, V]).
        ``u``: steering rows of the fed positions (None: unsteered)."""
        import contextlib

        import torch

        steering = self._steering.rows(u) if u is not None else contextlib.nullcontext()
        with torch.inference_mode(), steering:  # grad mode is per thread: set it in the thread that runs the forward
            out = self.model(**inputs, past_key_values=past, use_cache=True, output_hidden_states=capture)
        row = None
        if capture:
            # hidden_states[K+1]: [1, T, d] -> [T, d]
            row = out.hidden_states[self.settings.capture_layer + 1][0].float().cpu()
        return out.logits[0, -1].float(), row, out.past_key_values, out.logits[0]

    def _prefill(self, prompt: Prompt, capture: bool, prompt_k: int | None, u=None):
        import torch

        ids = torch.tensor([prompt.token_ids], device=self.device)  # [1, P]
        if prompt.inject_row is None:
            logits, row, past, every = self._forward(None, capture, u, input_ids=ids)
        else:
            with torch.inference_mode():
                embeds = self.model.get_input_embeddings()(ids)  # [1, P, d], includes any architecture scale
            embeds = embeds.clone()
            embeds[0, prompt.inject_at] = prompt.inject_row.to(self.device, torch.float32).to(embeds.dtype)
            logits, row, past, every = self._forward(None, capture, u, inputs_embeds=embeds)
        prompt_lps = prompt_logprobs(every, prompt.token_ids, prompt_k) if prompt_k is not None else None
        return logits, row, past, prompt_lps

    def _decode(self, token: int, past, capture: bool, u=None):
        import torch

        ids = torch.tensor([[token]], device=self.device)
        return self._forward(past, capture, u, input_ids=ids)[:3]
