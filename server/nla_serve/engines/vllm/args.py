"""From ``EngineSettings`` to a running ``AsyncLLM``: vLLM's engine arguments, the capture method
and its checks, and the environment the engine processes are spawned with.

Everything that decides how vLLM is configured is here, apart from the request-level code
(``engine``), so that one place answers "what did we ask vLLM for, and why":
- The engine core always runs in its own processes (``VLLM_ENABLE_V1_MULTIPROCESSING=1``): the
  capture connector deadlocks the in-process engine, and on CPU the OpenMP worker needs its own
  process anyway.
- One engine is built at a time per process (``BUILD_LOCK``): the build edits ``os.environ`` for
  the processes it spawns, and on GPU each engine sizes its memory against what is free when it
  starts.
- On CPU, vLLM warns that speculative decoding (which the speculative capture rides on) wants
  Intel OpenMP in ``LD_PRELOAD``; the engine processes inherit whatever the server is started with
  (``LD_PRELOAD=$VIRTUAL_ENV/lib/libiomp5.so``). On a shared 2-core machine the difference was
  within the noise, so nothing here sets it.
- The capture method (``resolve_capture_method``) is chosen and checked in the API process before
  anything is spawned, so an architecture neither method can capture is refused with a sentence
  rather than by an engine process dying.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

from nla_serve.engine_config import EngineSettings, resolve_eager
from nla_serve.engines.vllm.capture import protocol, row_store
from nla_serve.errors import EngineError
from nla_serve.model_folder import resolve_dtype_name

log = logging.getLogger(__name__)

_GiB = 1 << 30
BUILD_LOCK = threading.Lock()


def on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform here."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def build_llm(s: EngineSettings, *, cpu: bool, capture_method: str | None, architectures: list[str],
              capture_dir: str | None, stat_loggers: list) -> Any:
    """Build the ``AsyncLLM`` (blocking: spawns and waits for the engine processes). The caller
    holds ``BUILD_LOCK``."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

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
    if s.max_loras:
        kwargs.update(enable_lora=True, max_loras=s.max_loras, max_lora_rank=s.max_lora_rank)
    if s.disable_any_whitespace:
        # "auto" picks per request; vLLM allows the setting only with a backend that reads it
        kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    # vLLM's parallelism as given (only what differs from its defaults, so a plain engine is unchanged)
    kwargs.update({k: v for k, v in s.parallel.model_dump().items() if v not in (1, None)})
    if cpu:
        kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gib * _GiB)
    else:
        kwargs["gpu_memory_utilization"] = s.memory_fraction
    if s.capture_layer is not None:
        assert capture_dir is not None
        if capture_method == "embedded":
            row_store.register()  # this process validates the architecture name too
            kwargs["hf_overrides"] = row_store.hf_overrides(architectures, s.capture_layer)
        else:
            kwargs["speculative_config"] = protocol.speculative_config(s.capture_layer)
        kwargs["kv_transfer_config"] = KVTransferConfig(**protocol.kv_transfer_config(capture_dir))
    args = AsyncEngineArgs(**kwargs)
    if not cpu:
        return AsyncLLM.from_vllm_config(args.create_engine_config(UsageContext.ENGINE_CONTEXT),
                                         disable_log_stats=True, stat_loggers=stat_loggers)
    # CPU: VLLM_CPU_KVCACHE_SPACE (whole GiB, process-wide) would override this engine's own
    # kv_cache_gib while the config is built; hide it meanwhile.
    with _environ(VLLM_CPU_KVCACHE_SPACE=None):
        vllm_config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": _reserved_cpus_env(vllm_config)}
    if s.cpu_cores is not None:  # this engine's own cores (engine_config.split_cores)
        env["VLLM_CPU_OMP_THREADS_BIND"] = s.cpu_cores
    with _environ(**env):
        return AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=True, stat_loggers=stat_loggers)


def resolve_capture_method(method: str, architectures: list[str], model: str) -> str:
    """The capture method an engine uses: "embedded" (no draft token) where ``row_store``
    supports the architecture, else "speculative"; an explicit method is checked, not changed."""
    embedded = any(row_store.supported(a) for a in architectures)
    if method == "embedded" and not embedded:
        raise EngineError(
            f"{model}: --capture-method embedded supports the architectures "
            f"{', '.join(sorted(row_store.SUPPORTED))}, not {', '.join(architectures) or '(none in config.json)'}; "
            "use --capture-method speculative or auto")
    if method == "speculative" or not embedded:
        check_capture_architecture(architectures, model)
        return "speculative"
    return "embedded"


def check_capture_architecture(architectures: list[str], model: str) -> None:
    """Refuse at start, with the reason, a target whose vLLM class cannot output a mid-layer
    residual: the capture asks vLLM for auxiliary hidden states (the EAGLE-3 interface), which
    vLLM 0.32 implements for Llama, Mistral, Qwen2/2.5/3 and others, but not for Gemma-2/3 (the
    embedded method covers Gemma-3 its own way, see ``capture/row_store.py``). Without this check
    the engine process dies during start with vLLM's own terse error."""
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
        f"this model with --capture-method embedded if it is one of {', '.join(sorted(row_store.SUPPORTED))}, "
        "with --engine transformers, or without an NLA")


def _reserved_cpus_env(vllm_config) -> str | None:
    """The value of ``VLLM_CPU_NUM_OF_RESERVED_CPU`` a CPU engine's processes are started with:
    the operator's if set, else for a capturing engine what the same engine without capture
    reserves, else None (unset: vLLM's own choice).

    vLLM's CPU workers bind their OpenMP threads to all cores but those reserved for other
    processes: one per worker for the engine core, and, for any KV connector, one more per worker
    (a transfer thread of its own, as NIXL's). The capture connector has no thread: it copies rows
    in the worker's own step. Left to vLLM, a capturing engine on a 2-core machine would run its
    model on both cores (the plain engine on one) and its OpenMP threads would fight the engine
    core for them: on the tiny bench model that alone cost a large share of the tokens/s, and on a
    model whose matrix products do use a second core it made capture look faster than no capture
    (docs/benchmarks.md, 2026-12-07). So a capturing engine reserves what the same engine without
    capture would."""
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
