"""The production engine: vLLM's ``AsyncLLM`` behind the ``TargetEngine`` protocol.

One class serves both roles: the target (``capture_layer`` set: layer-K rows of every fed position,
delivered with the choice's updates one engine step behind its tokens, the rest with its final
update, see ``vllm_capture``) and the verbalizer
(``enable_prompt_embeds``: a prompt with one embedding row replaced, vLLM's mixed-mode prompt
embeddings). Several instances can live in one process; each owns its engine processes and its
capture directory.

Design choices:
- This is the only module of nla-serve that imports vllm, and only inside methods, so the package
  imports without it.
- The engine core always runs in its own processes (``VLLM_ENABLE_V1_MULTIPROCESSING=1``): the
  capture connector deadlocks the in-process engine, and on CPU the OpenMP worker needs its own
  process anyway. Building the engine blocks for 10-30 s, so ``start`` runs it in a thread and the
  event loop stays responsive.
- On CPU, vLLM warns that speculative decoding (which the capture rides on) wants Intel OpenMP in
  ``LD_PRELOAD``; the engine processes inherit whatever the server is started with
  (``LD_PRELOAD=$VIRTUAL_ENV/lib/libiomp5.so``). On a shared 2-core machine the difference was
  within the noise, so nothing here sets it.
- Requests go in with ``RequestOutputKind.DELTA`` and a fresh engine-side id per call
  (``vllm_capture.vllm_request_id``); ``abort(request_id)`` maps the caller's id to those.
- On CPU, a per-request ``seed`` with temperature > 0 crashes the whole engine as soon as that
  request's prompt is split by chunked prefill (vLLM rewinds a CPU ``torch.Generator`` offset,
  which CPU generators do not support). Whether a prompt is split depends on what else is in the
  batch, so such requests are refused with a ``ClientError`` on CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, AsyncIterator

from nla_serve.config import EngineSettings, resolve_eager
from nla_serve.engines import vllm_capture, vllm_row_store
from nla_serve.engines.base import check_prompt
from nla_serve.engines.vllm_capture_reader import CaptureDir
from nla_serve.errors import (ClientError, EngineError, NLAServeError, NotFoundError, OverloadedError,
                               UnavailableError)
from nla_serve.model_folder import resolve_dtype_name
from nla_serve.types import (CapturedRows, EngineStats, FinishReason, Prompt, SamplingOptions, StepOutput,
                             TokenLogprob)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_GiB = 1 << 30
_BUILD_LOCK = threading.Lock()
_SHUTDOWN_GRACE_S = 20.0
CAPTURE_MAX_AGE_S = 120.0  # captured rows nobody took for this long belong to no live request
CAPTURE_MAX_BYTES = 1 << 30  # never hold more than this in captured rows nobody has taken
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


class VLLMEngine:
    """``TargetEngine`` over ``vllm.v1.engine.async_llm.AsyncLLM``.

    Example::

        engine = VLLMEngine(EngineSettings(model="/models/qwen", capture_layer=20))
        await engine.start()
        async for out in engine.generate(Prompt(ids), SamplingOptions(max_tokens=8), "req-1"):
            ...  # out.captured: the rows that arrived with this update (one step behind the tokens)
        await engine.shutdown()
    """

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.tokenizer: "PreTrainedTokenizerBase" = None  # type: ignore[assignment]  # set by start()
        self.hidden_size = 0
        self.num_layers = 0
        self.max_model_len = 0
        self.on_cpu = False
        self.architectures: list[str] = []  # the target's config.json, read at start
        self.capture_method: str | None = None  # "embedded" or "speculative" once started with capture
        self._llm: Any = None  # AsyncLLM
        self.dtype: Any = None  # torch dtype the weights run in (known after start)
        self._capture: CaptureDir | None = None
        self._active: dict[str, set[str]] = {}  # caller's request id -> engine-side ids in flight
        self._janitor: asyncio.Task | None = None  # keeps the capture directory clean and bounded
        self.stats = EngineStats()  # updated by vLLM's stat-logger hook (see _stat_logger_factory)

    # ------------------------------------------------------------------------------------------
    # Life cycle
    # ------------------------------------------------------------------------------------------

    @property
    def capturing(self) -> bool:
        return self.settings.capture_layer is not None

    async def start(self) -> None:
        if self._llm is not None:
            return
        from transformers import AutoConfig, AutoTokenizer

        s = self.settings
        config = AutoConfig.from_pretrained(s.model)
        self.architectures = list(config.architectures or [])
        hf = config.get_text_config()
        self.hidden_size = int(hf.hidden_size)
        self.num_layers = int(hf.num_hidden_layers)
        if s.capture_layer is not None and not 0 <= s.capture_layer < self.num_layers - 1:
            # Block K's output is vLLM aux layer K+1, which exists only below the last block (and
            # HF's hidden_states[num_layers] is after the final norm, a different quantity).
            raise EngineError(
                f"capture_layer={s.capture_layer} is outside 0..{self.num_layers - 2} for a model of "
                f"{self.num_layers} blocks (vLLM exposes block outputs only below the last block)"
            )
        if s.capture_layer is not None:
            self.capture_method = resolve_capture_method(s.capture_method, self.architectures, s.model)
        self.tokenizer = AutoTokenizer.from_pretrained(s.model)
        if s.capture_layer is not None:
            self._capture = CaptureDir(vllm_capture.make_capture_dir(f"L{s.capture_layer}"))
        try:
            self._llm = await asyncio.to_thread(self._build)
        except BaseException:
            if self._capture is not None:
                self._capture.close()
                self._capture = None
            raise
        cfg = self._llm.vllm_config
        if self._capture is not None:
            self._janitor = asyncio.create_task(self._clean_captures(), name="nla-capture-janitor")
        self.max_model_len = int(cfg.model_config.max_model_len)
        self.dtype = cfg.model_config.dtype
        if s.warm_logprobs:
            try:
                await asyncio.wait_for(self._warm_logprobs(), timeout=120)
            except BaseException:  # cancelled or hung at start: leave no engine processes behind
                await self.shutdown()
                raise
        log.info(
            "vLLM engine up: %s dtype=%s max_model_len=%d capture_layer=%s prompt_embeds=%s",
            s.model, self.dtype, self.max_model_len, s.capture_layer, s.enable_prompt_embeds,
        )

    async def _warm_logprobs(self) -> None:
        """One two-token request with logprobs, so that vLLM's first-logprobs cost (about 2.5 s in
        the CPU worker, once per engine; vLLM's own start-up runs never ask for logprobs) is paid
        here rather than by the first user's first token. Its queue time is not reported."""
        try:
            async for _ in self.generate(Prompt([0, 0, 0, 0]), SamplingOptions(max_tokens=2, logprobs=1),
                                         "nla-warm-up", capture=False):
                pass
        except Exception as e:  # a slow first request later beats an engine that does not start
            log.warning("the logprobs warm-up request failed: %s", e)
        self.stats.queue_times.clear()

    def _build(self):
        """Build the AsyncLLM (blocking: spawns and waits for the engine processes).

        One engine at a time per process: the build edits ``os.environ`` for the processes it
        spawns, and on GPU each engine sizes its memory against what is free when it starts.
        """
        with _BUILD_LOCK:
            return self._build_locked()

    def _build_locked(self):
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        self.on_cpu = current_platform.is_cpu()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # the capture connector needs it
        kwargs: dict[str, Any] = dict(
            model=s.model,
            # "auto" is the checkpoint's own dtype, as on the reference engine (vLLM's own "auto"
            # would run a float32 checkpoint in bfloat16 on CPU and in float16/bfloat16 on GPU)
            dtype=resolve_dtype_name(s.dtype, s.model),
            seed=s.seed,
            max_model_len=s.max_model_len,
            # vLLM refuses a step budget below the number of sequences; a small budget (to force
            # chunked prefill) therefore also bounds the batch.
            max_num_seqs=min(s.max_num_seqs, s.max_num_batched_tokens or s.max_num_seqs),
            max_num_batched_tokens=s.max_num_batched_tokens,
            enable_prefix_caching=s.enable_prefix_caching,
            enforce_eager=resolve_eager(s.enforce_eager, s.device),
            enable_prompt_embeds=s.enable_prompt_embeds,
            disable_log_stats=True,
        )
        if s.compilation_config is not None:
            kwargs["compilation_config"] = dict(s.compilation_config)
        # vLLM's parallelism as given (only what differs from its defaults, so a plain engine is unchanged)
        kwargs.update({k: v for k, v in s.parallel.model_dump().items() if v not in (1, None)})
        if self.on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gib * _GiB)
        else:
            kwargs["gpu_memory_utilization"] = s.memory_fraction
        if s.capture_layer is not None:
            assert self._capture is not None
            if self.capture_method == "embedded":
                vllm_row_store.register()  # this process validates the architecture name too
                kwargs["hf_overrides"] = vllm_row_store.hf_overrides(self.architectures, s.capture_layer)
            else:
                kwargs["speculative_config"] = vllm_capture.speculative_config(s.capture_layer)
            kwargs["kv_transfer_config"] = KVTransferConfig(**vllm_capture.kv_transfer_config(self._capture.path))
        args = AsyncEngineArgs(**kwargs)
        loggers = [self._stat_logger_factory()]
        if not self.on_cpu:
            return AsyncLLM.from_vllm_config(args.create_engine_config(UsageContext.ENGINE_CONTEXT),
                                             disable_log_stats=True, stat_loggers=loggers)
        # CPU: VLLM_CPU_KVCACHE_SPACE (whole GiB, process-wide) would override this engine's own
        # kv_cache_gib while the config is built; hide it meanwhile.
        with _environ(VLLM_CPU_KVCACHE_SPACE=None):
            vllm_config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
        with _environ(VLLM_CPU_NUM_OF_RESERVED_CPU=_reserved_cpus_env(vllm_config)):
            return AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=True, stat_loggers=loggers)

    def _stat_logger_factory(self):
        """A vLLM stat logger (runs in this process, on AsyncLLM's output handler) that keeps
        ``self.stats`` current: KV-cache usage, running/waiting counts, per-request queue times."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self.stats

        class _Collector(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    stats.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                    stats.num_running = int(scheduler_stats.num_running_reqs)
                    stats.num_waiting = int(scheduler_stats.num_waiting_reqs)
                if iteration_stats is not None:
                    stats.preemptions += iteration_stats.num_preempted_reqs
                    stats.preemptions_unexported += iteration_stats.num_preempted_reqs
                    if len(stats.queue_times) < 10_000:
                        stats.queue_times.extend(r.queued_time for r in iteration_stats.finished_requests)

            def log_engine_initialized(self):
                pass

        return _Collector

    async def _clean_captures(self) -> None:
        """Every second: read the step files that arrived (dropping aborted requests' rows,
        ``discard``), drop rows nobody took for ``CAPTURE_MAX_AGE_S`` and the oldest beyond
        ``CAPTURE_MAX_BYTES``; export what is held. Rows are normally taken within a step."""
        while self._capture is not None:
            cap = self._capture
            cap.sweep()
            self.stats.capture_dir_bytes = cap.collect_garbage(CAPTURE_MAX_AGE_S, CAPTURE_MAX_BYTES)
            await asyncio.sleep(1.0)

    async def shutdown(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            self._janitor = None
        llm, self._llm = self._llm, None
        if llm is not None:
            for keys in list(self._active.values()):
                for key in list(keys):
                    try:
                        await llm.abort(key)
                    except Exception:  # the engine may already be dead
                        pass
            self._active.clear()
            # Stop reading outputs first: otherwise the reader logs the engine's exit as an error.
            if llm.output_handler is not None:
                llm.output_handler.cancel()
            # Joins the engine processes. They need ~4 s to exit cleanly on a small CPU machine;
            # vLLM's default grace (5 s) often SIGKILLs the engine core instead, which can leave
            # its shared-memory queues behind in /dev/shm.
            # A dead engine has nothing left to finish: do not wait the full grace for it.
            await asyncio.to_thread(llm.shutdown, 2.0 if llm.errored else _SHUTDOWN_GRACE_S)
            # AsyncLLM.__del__ shuts down again; at interpreter exit that raises. Once is enough.
            llm.shutdown = lambda timeout=None: None
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    @property
    def alive(self) -> bool:
        # vLLM's monitor thread marks the engine dead as soon as an engine-core process exits
        return self._llm is not None and not self._llm.errored

    def engine_pids(self) -> list[int]:
        """The engine-core processes' pids (for fault tests and the soak run)."""
        manager = getattr(getattr(self._llm, "engine_core", None), "resources", None)
        manager = getattr(manager, "engine_manager", None)
        return [proc.pid for proc in getattr(manager, "processes", [])]

    def in_flight(self) -> dict[str, int]:
        return {"requests": len(self._active),
                "discarded_captures": self._capture.discarded if self._capture is not None else 0}

    async def abort(self, request_id: str) -> None:
        if self._llm is None:
            return
        for key in list(self._active.get(request_id, ())):
            await self._llm.abort(key)  # an external id: aborts all n children too

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    async def generate(
        self, prompt: Prompt, options: SamplingOptions, request_id: str, capture: bool = True
    ) -> AsyncIterator[StepOutput]:
        llm = self._llm
        if llm is None:
            raise EngineError("the vLLM engine is not running; call start() first")
        capture = capture and self.capturing
        params = self._sampling_params(options, prompt, capture)
        engine_prompt = self._engine_prompt(prompt)
        key = vllm_capture.vllm_request_id(request_id)
        n = options.n
        num_prompt = len(prompt.token_ids)
        # Token ids the rows must belong to; mixed-mode prompts hold 0 at embedded positions.
        fed_prompt = list(prompt.token_ids)
        if prompt.inject_at is not None:
            fed_prompt[prompt.inject_at] = 0
        fed: dict[int, list[int]] = {i: list(fed_prompt) for i in range(n)}  # per choice: prompt + its tokens
        texts: dict[int, str] = {i: "" for i in range(n)}
        done: set[int] = set()
        delivered: set[int] = set()  # choices whose rows were taken
        next_row: dict[int, int] = {i: 0 for i in range(n)}  # rows handed on so far, per choice
        self._active.setdefault(request_id, set()).add(key)
        stream = llm.generate(engine_prompt, params, key)
        outs = self._translate_errors(stream)
        try:
            async for out in outs:
                for c in out.outputs:
                    if c.index in done:
                        continue
                    delta = list(c.token_ids)
                    fed[c.index].extend(delta)
                    reason = None if c.finish_reason is None else _FINISH.get(c.finish_reason, "abort")
                    text = c.text
                    if reason is not None and reason != "abort":
                        text += self._held_back_text(fed[c.index][num_prompt:], texts[c.index] + text)
                    texts[c.index] += text
                    captured = None
                    if capture and self._capture is not None and reason != "abort":
                        # rows settled by earlier engine steps; at the end, the rest, up to P+G-2
                        first = next_row[c.index]
                        if reason is None:
                            rows = self._capture.take_rows(key, c.index, first, fed[c.index])
                        else:
                            delivered.add(c.index)  # its last piece is used up here, even if it fails
                            rows = await self._capture.finish(key, c.index, len(fed[c.index]) - 1, fed[c.index],
                                                              start=first, alive=lambda: not llm.errored)
                        if rows is not None:
                            captured = CapturedRows(start=first, rows=rows)
                            next_row[c.index] = captured.end
                    if reason is not None:
                        done.add(c.index)
                    yield StepOutput(
                        index=c.index,
                        token_ids=delta,
                        text=text,
                        finished=reason is not None,
                        finish_reason=reason,
                        captured=captured,
                        num_prompt_tokens=num_prompt,
                        logprobs=_logprobs(delta, c.logprobs, options.logprobs),
                    )
        except vllm_capture.CaptureError as e:
            raise EngineError(f"request {request_id}: {e}") from e
        finally:
            await outs.aclose()
            if len(done) < n:
                await stream.aclose()  # AsyncLLM aborts the request when its stream is closed
            keys = self._active.get(request_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._active[request_id]
            if capture and self._capture is not None and len(delivered) < n:
                self._capture.discard(key, n - len(delivered))  # rows of aborted choices, whenever they land

    def _held_back_text(self, token_ids: list[int], text: str) -> str:
        """What vLLM's incremental detokenizer still holds at the end: the U+FFFD of an incomplete
        UTF-8 sequence, which the reference engine (a plain ``decode``) does return."""
        full = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        rest = full[len(text):] if full.startswith(text) else ""
        return rest if rest and not rest.strip("\ufffd") else ""

    async def _translate_errors(self, stream):
        """vLLM's exceptions -> ours, through the one map (``map_vllm_error``)."""
        from vllm.exceptions import VLLMError

        try:
            async for out in stream:
                yield out
        except VLLMError as e:
            raise map_vllm_error(e) from e

    def _sampling_params(self, o: SamplingOptions, prompt: Prompt, capture: bool):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        check_prompt(prompt, o, self.max_model_len)
        if self.on_cpu and o.seed is not None and not o.greedy:
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
                output_kind=RequestOutputKind.DELTA,
                extra_args=vllm_capture.capture_extra_args() if capture else None,
            )
        except Exception as e:  # vLLM validates ranges (temperature < 0, top_p > 1, n > 1 when greedy, ...)
            mapped = map_vllm_error(e)
            if isinstance(mapped, ClientError):
                raise mapped from e
            raise

    def _engine_prompt(self, prompt: Prompt) -> dict[str, Any]:
        if prompt.inject_at is None:
            return {"prompt_token_ids": list(prompt.token_ids)}
        if not self.settings.enable_prompt_embeds:
            raise ClientError(
                "this engine was started without enable_prompt_embeds, so it cannot take a prompt "
                "with an injected embedding row; start it with enable_prompt_embeds=True"
            )
        import torch

        row = prompt.inject_row
        if tuple(row.shape) != (self.hidden_size,):
            raise ClientError(f"inject_row has shape {tuple(row.shape)}; expected ({self.hidden_size},)")
        # Mixed mode: full-length embeddings, zeros where the engine embeds the token itself.
        embeds = torch.zeros(len(prompt.token_ids), self.hidden_size, dtype=self.dtype)  # [P, d]
        embeds[prompt.inject_at] = row.detach().to("cpu", torch.float32).to(self.dtype)
        mask = [True] * len(prompt.token_ids)
        mask[prompt.inject_at] = False
        return {
            "prompt_embeds": embeds,
            "prompt_token_ids": list(prompt.token_ids),
            "prompt_is_token_ids": mask,
        }


# vLLM's parameter names -> the request fields our clients sent
_PARAMS = {"max_tokens": "max_tokens", "n": "n", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
           "seed": "seed", "stop": "stop", "logprobs": "logprobs"}


def resolve_capture_method(method: str, architectures: list[str], model: str) -> str:
    """The capture method an engine uses: "embedded" (no draft token) where ``vllm_row_store``
    supports the architecture, else "speculative"; an explicit method is checked, not changed."""
    embedded = any(vllm_row_store.supported(a) for a in architectures)
    if method == "embedded" and not embedded:
        raise EngineError(
            f"{model}: --capture-method embedded supports the architectures "
            f"{', '.join(sorted(vllm_row_store.SUPPORTED))}, not {', '.join(architectures) or '(none in config.json)'}; "
            "use --capture-method speculative or auto")
    if method == "speculative" or not embedded:
        check_capture_architecture(architectures, model)
        return "speculative"
    return "embedded"


def check_capture_architecture(architectures: list[str], model: str) -> None:
    """Refuse at start, with the reason, a target whose vLLM class cannot output a mid-layer
    residual: the capture asks vLLM for auxiliary hidden states (the EAGLE-3 interface), which
    vLLM 0.32 implements for Llama, Mistral, Qwen2/2.5/3 and others, but not for Gemma-2/3 (the
    embedded method covers Gemma-3 its own way, see vllm_row_store). Without this check the
    engine process dies during start with vLLM's own terse error."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_eagle3

    for arch in architectures:
        try:
            cls = ModelRegistry._try_load_model_cls(arch)  # imports only that architecture's module
        except Exception:  # noqa: BLE001 - an unloadable class is reported below like an unknown one
            cls = None
        if cls is not None and supports_eagle3(cls):
            return
    import vllm

    raise EngineError(
        f"{model}: architecture {', '.join(architectures) or '(none in config.json)'} cannot be captured by the "
        f"vLLM engine: vLLM {vllm.__version__} gives mid-layer activations (auxiliary hidden states, its EAGLE-3 "
        "interface) only for some architectures (Llama, Mistral, Qwen2/2.5/3 among them; not Gemma-2/3). Serve "
        f"this model with --capture-method embedded if it is one of {', '.join(sorted(vllm_row_store.SUPPORTED))}, "
        "with --engine transformers, or without an NLA")


def map_vllm_error(e: BaseException) -> NLAServeError:
    """The one translation of vLLM's exceptions (and the plain ones it raises for bad values) into
    ours: client errors become 400/404 naming the parameter, queue limits 429, a dead engine 503,
    anything else 500. A test checks that every exception class vLLM defines lands on a status
    of the right family."""
    from vllm.exceptions import (GracefulHTTPError, VLLMClientError, VLLMNotFoundError, VLLMServerError,
                                 VLLMValidationError)
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    if isinstance(e, NLAServeError):
        return e
    if isinstance(e, VLLMValidationError):
        message = super(VLLMValidationError, e).__str__()  # without vLLM's "(parameter=..., value=...)"
        return ClientError(message, param=_PARAMS.get(e.parameter or "", e.parameter))
    if isinstance(e, VLLMNotFoundError):
        return NotFoundError(str(e))
    if isinstance(e, VLLMClientError):
        return ClientError(str(e))
    if isinstance(e, GracefulHTTPError):
        status = int(e.http_status)
        if status == 429:
            return OverloadedError(e.message, code="429")
        if 400 <= status < 500:
            return ClientError(e.message)
        return UnavailableError(e.message) if status == 503 else EngineError(e.message)
    if isinstance(e, EngineDeadError):
        return UnavailableError("the vLLM engine died; it is being restarted, retry shortly")
    if isinstance(e, EngineGenerateError):
        cause = e.__cause__
        if isinstance(cause, (ValueError, TypeError, OverflowError)):
            return ClientError(str(cause))
        return EngineError(f"vLLM failed the request: {cause or e}")
    if isinstance(e, VLLMServerError):
        return EngineError(f"vLLM failed the request: {e}")
    if isinstance(e, (ValueError, TypeError, OverflowError)):
        return ClientError(str(e))
    return EngineError(f"vLLM failed the request ({type(e).__name__}: {e})")


def _reserved_cpus_env(vllm_config) -> str | None:
    """The value of ``VLLM_CPU_NUM_OF_RESERVED_CPU`` a CPU engine's processes are started with:
    the operator's if set, else for a capturing engine what the same engine without capture
    reserves, else None (unset: vLLM's own choice).

    vLLM's CPU workers bind their OpenMP threads to all cores but those reserved for other
    processes: one per worker for the engine core, and, for any KV connector, one more per worker
    (a transfer thread of its own, as NIXL's). The capture connector has no thread: it copies rows
    in the worker's own step. Left to vLLM, a capturing engine on a 2-core machine would run its
    model on both cores (the plain engine on one) and its OpenMP threads would fight the engine
    core for them: on the tiny bench model that alone cost a third of the tokens/s, and on a model
    whose matrix products do use a second core it made capture look faster than no capture.
    So a capturing engine reserves what the same engine without capture would."""
    if vllm_config.kv_transfer_config is None or "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ:
        return os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU")
    from vllm.platforms import CpuArchEnum, current_platform

    # vLLM's own rule without a connector (vllm/utils/ompmultiprocessing.py)
    per_worker = current_platform.get_cpu_architecture() in (CpuArchEnum.X86, CpuArchEnum.ARM, CpuArchEnum.RISCV)
    reserved = str(vllm_config.parallel_config.local_world_size if per_worker else 1)
    log.info("capture on CPU: reserving %s core(s) for the engine core, as without capture (vLLM will "
             "warn that this is below its minimum for a KV connector: intended)", reserved)
    return reserved


@contextlib.contextmanager
def _environ(**values: str | None):
    """Set (or, with None, remove) environment variables for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _logprobs(token_ids: list[int], positions, k: int | None) -> list[TokenLogprob] | None:
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


__all__ = ["VLLMEngine", "map_vllm_error"]
