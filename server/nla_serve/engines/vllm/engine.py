"""The production engine: vLLM's ``AsyncLLM`` behind the ``TargetEngine`` protocol.

One class serves both roles: the target (``capture_layer`` set: layer-K rows of every fed position,
delivered with the choice's updates one engine step behind its tokens, the rest with its final
update, see ``capture/protocol.py``) and the verbalizer (``enable_prompt_embeds``: a prompt with one
embedding row replaced, vLLM's mixed-mode prompt embeddings). Several instances can live in one
process; each owns its engine processes and its capture directory.

This module is the engine's life cycle and the life of a request (start, shutdown, generate,
abort, in_flight); how vLLM is configured is ``args``, the request and output translations are
``translate``, error mapping ``errors``, load figures ``stats``. Building the engine blocks for
10-30 s (it spawns the engine processes), so ``start`` runs it in a thread and the event loop stays
responsive. Requests go in with ``RequestOutputKind.DELTA`` and a fresh engine-side id per call
(``protocol.vllm_request_id``); ``abort(request_id)`` maps the caller's id to those.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

from nla_serve.engine_config import EngineSettings
from nla_serve.engines.base import check_intervention
# by full path, not `from nla_serve.engines.vllm import ...`: the package re-exports this module (a cycle)
import nla_serve.engines.vllm.args as args
import nla_serve.engines.vllm.translate as translate
from nla_serve.engines.vllm.capture import protocol
from nla_serve.engines.vllm.capture.reader import CaptureDir
from nla_serve.engines.vllm.errors import translate_errors
from nla_serve.engines.vllm.stats import stat_logger_factory
from nla_serve.errors import ClientError, EngineError
from nla_serve.types import Adapter, CapturedRows, EngineStats, Intervention, Prompt, SamplingOptions, StepOutput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_SHUTDOWN_GRACE_S = 20.0
CAPTURE_MAX_AGE_S = 120.0  # captured rows nobody took for this long belong to no live request
CAPTURE_MAX_BYTES = 1 << 30  # never hold more than this in captured rows nobody has taken


class VLLMEngine:
    """``TargetEngine`` over ``vllm.v1.engine.async_llm.AsyncLLM``.

    Example::

        engine = VLLMEngine(EngineSettings(model="/models/qwen", capture_layer=20))
        await engine.start()
        async for out in engine.generate(Prompt(ids), SamplingOptions(max_tokens=8), "req-1"):
            ...  # out.captured: the rows that arrived with this update (one step behind the tokens)
        await engine.shutdown()
    """

    constrains_decoding = True  # structured outputs through vLLM's backends (xgrammar by default)

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
        self.stats = EngineStats()  # updated by vLLM's stat-logger hook (see stats.stat_logger_factory)

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
            self.capture_method = args.resolve_capture_method(s.capture_method, self.architectures, s.model)
        self.tokenizer = AutoTokenizer.from_pretrained(s.model)
        if s.capture_layer is not None:
            self._capture = CaptureDir(protocol.make_capture_dir(f"L{s.capture_layer}"))
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
        """One two-token request with logprobs, so that vLLM's first-logprobs cost (seconds in the
        CPU worker, once per engine, docs/benchmarks.md; vLLM's own start-up runs never ask for
        logprobs) is paid here rather than by the first user's first token. Its queue time is not
        reported."""
        try:
            async for _ in self.generate(Prompt([0, 0, 0, 0]), SamplingOptions(max_tokens=2, logprobs=1),
                                         "nla-warm-up", capture=False):
                pass
        except Exception as e:  # a slow first request later beats an engine that does not start
            log.warning("the logprobs warm-up request failed: %s", e)
        self.stats.queue_times.clear()

    def _build(self):
        """Build the AsyncLLM (blocking: spawns and waits for the engine processes), one engine at
        a time per process (``args.BUILD_LOCK``)."""
        with args.BUILD_LOCK:
            self.on_cpu = args.on_cpu()
            return args.build_llm(
                self.settings, cpu=self.on_cpu, capture_method=self.capture_method,
                architectures=self.architectures,
                capture_dir=self._capture.path if self._capture is not None else None,
                stat_loggers=[stat_logger_factory(self.stats)],
            )

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

    def _check_steering(self, intervention: Intervention | None) -> None:
        """Steering rides on the embedded capture (its model class adds the vector, its connector
        places it: capture/steering.py); pipeline parallelism is refused there."""
        if intervention is None:
            return
        if self.capture_method != "embedded" or self.settings.parallel.pipeline_parallel_size > 1:
            raise ClientError("steering needs the embedded capture method and no pipeline parallelism "
                              f"(this engine: capture method {self.capture_method}, pipeline parallel size "
                              f"{self.settings.parallel.pipeline_parallel_size})", param="steering")
        check_intervention(intervention, hidden_size=self.hidden_size, num_layers=self.num_layers,
                           capture_layer=self.settings.capture_layer)

    async def generate(
        self, prompt: Prompt, options: SamplingOptions, request_id: str, capture: bool = True,
        intervention: Intervention | None = None, adapter: Adapter | None = None,
    ) -> AsyncIterator[StepOutput]:
        llm = self._llm
        if llm is None:
            raise EngineError("the vLLM engine is not running; call start() first")
        self._check_steering(intervention)
        capture = capture and self.capturing
        params = translate.sampling_params(options, prompt, capture, max_model_len=self.max_model_len,
                                           on_cpu=self.on_cpu, speculative=self.capture_method == "speculative",
                                           steering=intervention.as_wire() if intervention is not None else None)
        engine_prompt = translate.engine_prompt(prompt, enable_prompt_embeds=self.settings.enable_prompt_embeds,
                                                hidden_size=self.hidden_size, dtype=self.dtype,
                                                cache_salt=intervention.fingerprint() if intervention is not None else None)
        key = protocol.vllm_request_id(request_id)
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
        prompt_lps: list | None = None  # the prompt's logprobs: vLLM sends them once, with n > 1 too
        prompt_lps_sent: set[int] = set()  # choices handed them (with their first update after they came)
        next_row: dict[int, int] = {i: 0 for i in range(n)}  # rows handed on so far, per choice
        self._active.setdefault(request_id, set()).add(key)
        stream = llm.generate(engine_prompt, params, key, lora_request=translate.lora_request(adapter))
        outs = translate_errors(stream)
        try:
            async for out in outs:
                if options.prompt_logprobs is not None and out.prompt_logprobs and prompt_lps is None:
                    prompt_lps = translate.prompt_logprobs(prompt.token_ids, out.prompt_logprobs,
                                                           options.prompt_logprobs)
                for c in out.outputs:
                    if c.index in done:
                        continue
                    delta = list(c.token_ids)
                    fed[c.index].extend(delta)
                    reason = None if c.finish_reason is None else translate.FINISH.get(c.finish_reason, "abort")
                    text = c.text
                    if reason is not None and reason != "abort":
                        text += translate.held_back_text(self.tokenizer, fed[c.index][num_prompt:],
                                                         texts[c.index] + text)
                    texts[c.index] += text
                    captured = None
                    if capture and self._capture is not None and reason != "abort":
                        if reason is not None:
                            delivered.add(c.index)  # its last piece is used up here, even if it fails
                        captured = await self._rows(llm, key, c.index, next_row[c.index], fed[c.index],
                                                    finished=reason is not None)
                        if captured is not None:
                            next_row[c.index] = captured.end
                    if reason is not None:
                        done.add(c.index)
                    first_prompt_lps = None
                    if prompt_lps is not None and c.index not in prompt_lps_sent:
                        prompt_lps_sent.add(c.index)
                        first_prompt_lps = prompt_lps
                    yield StepOutput(
                        index=c.index,
                        token_ids=delta,
                        text=text,
                        finished=reason is not None,
                        finish_reason=reason,
                        captured=captured,
                        num_prompt_tokens=num_prompt,
                        logprobs=translate.logprobs(delta, c.logprobs, options.logprobs),
                        prompt_logprobs=first_prompt_lps,
                    )
        except protocol.CaptureError as e:
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

    async def _rows(self, llm: Any, key: str, index: int, first: int, fed: list[int], *,
                    finished: bool) -> CapturedRows | None:
        """The rows of choice ``index`` from ``first`` on: while it runs, those settled by earlier
        engine steps; once it finished, the rest, up to P+G-2 (``fed``: its prompt and tokens)."""
        assert self._capture is not None
        if not finished:
            rows = self._capture.take_rows(key, index, first, fed)
        else:
            rows = await self._capture.finish(key, index, len(fed) - 1, fed, start=first,
                                              alive=lambda: not llm.errored)
        return CapturedRows(start=first, rows=rows, layer=self.settings.capture_layer) if rows is not None else None
