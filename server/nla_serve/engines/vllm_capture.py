"""Layer-K activations out of vLLM: the capture connector, its configuration, and the API-side reader.

How activations are captured
    vLLM v1 has no "return hidden states" request option. The engine is started with the
    ``extract_hidden_states`` speculative method (``eagle_aux_hidden_state_layer_ids=[K+1]``): on
    every step the target model also emits the residual stream after decoder block K for every token
    it fed, and a cache-only "draft" layer stores those rows in a KV-cache group of their own, at the
    same slots as the tokens' ordinary KV. So a request's rows live in its paged blocks exactly like
    its KV, which is what keeps them right under continuous batching, chunked prefill (each chunk
    writes its own slots), preemption (recomputed with the blocks) and prefix-cache hits (the cached
    blocks already hold the rows for the shared prefix; block hashes cover the tokens, so a hit means
    the same tokens at the same positions). ``NLAShmHiddenStatesConnector`` below is a KV connector
    that, when a capturing request ends, keeps its blocks alive for one more engine step, gathers the
    rows from them in the worker, and writes one safetensors file per request into a per-engine
    directory under ``/dev/shm`` (written to a hidden temporary name, then renamed, so a reader never
    sees half a file). The API process (``CaptureDir``) finds the file by request id, reads it and
    deletes it. The stock ``ExampleHiddenStatesConnector`` does the same with pinned memory, CUDA
    streams and a writer thread pool, which crash on CPU; this one copies synchronously between
    engine steps (on GPU that waits for the step in flight), once per request, a few hundred KB.

When they arrive
    Only at the end of the request: the final ``StepOutput`` of each choice carries all its rows
    (positions ``0 .. P+G-2``), typically one engine step after the last token.

What the last position gets
    Nothing: the last sampled token is never fed through the model, so it has no row (rows are
    ``P + G - 1``). Rows are the model's own dtype on the wire (bf16 stays bf16 in shared memory) and
    become float32 in the reader.

What it costs
    Each decode step carries one extra "draft" token per running request (the method occupies the
    speculative slot, so no real speculative decoding can run beside it): twice the tokens per
    decode step. Where decode is memory-bound (GPU) that is cheap; on CPU, where it is closer to
    compute-bound, it is not: on a shared 2-core x86 machine, 8 concurrent streams of SmolLM2-135M
    (bf16, eager) went from ~170 tokens/s to 60-145 tokens/s (very noisy), and a random 8-block
    fp32 model, compiled, from 1250 to 1040 (``bench/capture_overhead.py``). When the model repeats
    its last token the "draft" is accepted and that token comes free. KV memory grows by
    ``d_model`` elements per token for the row store (for Qwen2.5-7B about 12% on top of its KV).
    Every request pays the compute, capturing or not; only capturing requests
    (``kv_transfer_params = {"nla_capture": True}``) pay the copy (a few hundred KB, once) and the
    file. An engine built without ``capture_layer`` pays nothing.

Request ids
    ``AsyncLLM`` makes the engine-side id ``"<id>-<8 random chars>"``, and the n>1 children
    ``"<index>_<id>-<8 chars>"``. ``vllm_request_id`` makes ``<id>`` unique and free of ``_`` and
    ``-`` so that ``child_index`` can tell which file belongs to which choice by prefix alone.

Aborts and stop strings
    The engine core cannot tell a client abort from the abort the API process sends when it sees a
    stop string (stop strings are matched on detokenized text, outside the engine core): both arrive
    as aborts, so rows are written for every capturing request that had computed anything. The reader
    takes the file of a stop-string finish like any other and deletes the files of real aborts as they
    appear (``discard``); ``close`` removes the whole directory.

Only ``vllm_engine.py`` and vLLM's engine processes import this module's connector class, which is
built on first access (module ``__getattr__``), so the bookkeeping here imports without vLLM.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

CONNECTOR_NAME = "NLAShmHiddenStatesConnector"
CONNECTOR_MODULE = __name__
CAPTURE_PARAM = "nla_capture"  # key in a request's kv_transfer_params that asks for its rows
_SUFFIX = ".safetensors"
_ERROR_SUFFIX = ".error"


# ----------------------------------------------------------------------------------------------
# Configuration (API side, before the engine starts)
# ----------------------------------------------------------------------------------------------


def speculative_config(capture_layer: int) -> dict[str, Any]:
    """The speculative method that makes the target emit HF ``hidden_states[K+1]`` for layer K."""
    return {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [capture_layer + 1]}},
    }


def kv_transfer_config(capture_dir: str) -> dict[str, Any]:
    """Names the connector by module path so vLLM's engine processes import it from here."""
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"capture_dir": capture_dir},
    }


def capture_extra_args() -> dict[str, Any]:
    """``SamplingParams.extra_args`` of a request whose rows should be delivered."""
    return {"kv_transfer_params": {CAPTURE_PARAM: True}}


def make_capture_dir(tag: str = "engine") -> str:
    """A fresh private directory in shared memory (``/dev/shm``; the temp dir where there is none)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix=f"nla-serve-{_safe(tag)}-{os.getpid()}-", dir=base)


# ----------------------------------------------------------------------------------------------
# Request-id bookkeeping (pure)
# ----------------------------------------------------------------------------------------------


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", ".", text).strip(".")


def vllm_request_id(request_id: str) -> str:
    """A unique id to hand ``AsyncLLM`` for one ``generate`` call.

    Only letters, digits and dots (no ``_``, no ``-``), so the engine-side ids built from it parse
    back unambiguously; it keeps a readable piece of the caller's id for logs.
    """
    head = _safe(request_id)[:48] or "req"
    if not head[0].isalnum():
        head = "r" + head
    return f"{head}.{uuid.uuid4().hex[:12]}"


def child_index(key: str, internal_id: str) -> int | None:
    """Which choice an engine-side request id belongs to, or None if it is not one of ``key``'s.

    ``key-xxxxxxxx`` (n == 1) is choice 0; ``3_key-xxxxxxxx`` (a child of an n > 1 request) is 3.
    """
    if internal_id.startswith(key + "-"):
        return 0
    head, sep, rest = internal_id.partition("_")
    if sep and head.isdigit() and rest.startswith(key + "-"):
        return int(head)
    return None


def key_of(internal_id: str) -> str:
    """The ``vllm_request_id`` an engine-side id was made from (inverse of the two forms above)."""
    head, sep, rest = internal_id.partition("_")
    base = rest if sep and head.isdigit() else internal_id
    return base.rsplit("-", 1)[0]


def capture_file(capture_dir: str, internal_id: str) -> str:
    """Where the connector writes the rows of one engine-side request."""
    return os.path.join(capture_dir, internal_id + _SUFFIX)


def rows_to_save(num_tokens: int, num_computed_tokens: int) -> int:
    """Rows a finished request holds: every computed position except the last sampled token.

    ``num_tokens`` is prompt + output; the last output token was never fed. An abort during prefill
    holds only the computed part of the prompt.
    """
    return max(0, min(num_tokens - 1, num_computed_tokens))


def block_slots(block_ids: list[int], block_size: int, num_rows: int) -> list[int]:
    """Flat KV slots of positions ``0 .. num_rows-1`` given a request's block table."""
    need = math.ceil(num_rows / block_size) if num_rows else 0
    if need > len(block_ids):
        raise ValueError(f"{num_rows} rows need {need} blocks of {block_size}; the request has {len(block_ids)}")
    return [b * block_size + o for b in block_ids[:need] for o in range(block_size)][:num_rows]


# ----------------------------------------------------------------------------------------------
# API side: find, read and delete the files
# ----------------------------------------------------------------------------------------------


@dataclass
class CaptureDir:
    """The API process's end of one engine's capture directory.

    Example::

        cap = CaptureDir(make_capture_dir("target"))
        rows = await cap.wait(key, index=0, n=1, num_rows=P + G - 1, alive=lambda: not engine.errored)
        cap.close()
    """

    path: str
    poll_s: tuple[float, float] = (0.0005, 0.005)  # first and longest wait between directory scans
    discard_after_s: float = 120.0
    _graveyard: dict[str, float] = field(default_factory=dict)  # key -> forget after (monotonic)

    def find(self, key: str, index: int, n: int) -> str | None:
        """File name (in ``path``) of choice ``index`` of ``key``, if it has arrived."""
        prefix = f"{key}-" if n == 1 else f"{index}_{key}-"
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return None
        for name in names:
            if name.startswith(prefix) and (name.endswith(_SUFFIX) or name.endswith(_ERROR_SUFFIX)):
                return name
        return None

    def read(self, name: str, num_rows: int, token_ids: list[int] | None = None) -> "torch.Tensor":
        """Rows ``0 .. num_rows-1`` as float32 [num_rows, d]; deletes the file."""
        from safetensors.torch import load_file

        full = os.path.join(self.path, name)
        try:
            if name.endswith(_ERROR_SUFFIX):
                with open(full) as f:
                    raise CaptureError(f"the capture connector failed: {f.read().strip()}")
            data = load_file(full)
        finally:
            _remove(full)
        rows = data["hidden_states"]
        if rows.shape[0] < num_rows:
            raise CaptureError(f"{name}: {rows.shape[0]} rows captured, {num_rows} expected")
        if token_ids is not None:
            saved = data["token_ids"][:num_rows].tolist()
            want = list(token_ids[:num_rows])
            if saved != want[: len(saved)]:
                raise CaptureError(f"{name}: captured rows belong to other tokens than this choice's")
        return rows[:num_rows].float()

    async def wait(
        self,
        key: str,
        index: int,
        n: int,
        num_rows: int,
        token_ids: list[int] | None = None,
        *,
        alive: Callable[[], bool] = lambda: True,
        timeout_s: float = 60.0,
    ) -> "torch.Tensor":
        """Wait for choice ``index`` of ``key`` to arrive, then ``read`` it."""
        deadline = time.monotonic() + timeout_s
        delay = self.poll_s[0]
        while True:
            name = self.find(key, index, n)
            if name is not None:
                return self.read(name, num_rows, token_ids)
            if not alive():
                raise CaptureError("the engine stopped before delivering the captured rows")
            if time.monotonic() > deadline:
                raise CaptureError(f"no captured rows for {key} choice {index} after {timeout_s:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.poll_s[1])

    def discard(self, key: str) -> None:
        """Delete ``key``'s files now and whenever they appear later (aborted requests)."""
        self._graveyard[key] = time.monotonic() + self.discard_after_s
        self.sweep()

    def sweep(self) -> None:
        now = time.monotonic()
        for key, until in list(self._graveyard.items()):
            if until < now:
                del self._graveyard[key]
        if not self._graveyard:
            return
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith("."):
                continue  # still being written
            for suffix in (_SUFFIX, _ERROR_SUFFIX):
                if name.endswith(suffix) and key_of(name[: -len(suffix)]) in self._graveyard:
                    _remove(os.path.join(self.path, name))

    def pending_files(self) -> list[str]:
        try:
            return sorted(os.listdir(self.path))
        except FileNotFoundError:
            return []

    def close(self) -> None:
        self._graveyard.clear()
        shutil.rmtree(self.path, ignore_errors=True)


class CaptureError(RuntimeError):
    """Rows that should have arrived did not, or do not fit the request."""


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------------------------
# Engine side: the KV connector (runs in vLLM's scheduler and worker processes)
# ----------------------------------------------------------------------------------------------


@dataclass
class PendingCapture:
    """One finished request's rows to write: sent from the scheduler to the worker."""

    req_id: str
    path: str
    block_ids: list[int]  # the hidden-state group's blocks, in position order
    num_rows: int
    token_ids: list[int]  # the tokens of those rows (prompt + output, without the last)


def _build_connector_class():
    """Subclass vLLM's hidden-states connector; called on first access to ``CONNECTOR_NAME``.

    Reused from the stock class: locating the hidden-state KV group and its block size,
    ``register_kv_caches`` (finds the cache-only layer's buffer, views
    ``[num_blocks, num_states, block_size, d]``), the layout it needs and ``get_finished_count``
    (only tensor-parallel rank 0 writes).
    """
    import torch
    from safetensors.torch import save_file
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata
    from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
        ExampleHiddenStatesConnector,
    )
    from vllm.logger import init_logger
    from vllm.utils.gpu_sync_debug import gpu_sync_allowed

    logger = init_logger(CONNECTOR_MODULE)

    @dataclass
    class CaptureMetadata(KVConnectorMetadata):
        saves: list[PendingCapture] = field(default_factory=list)

    class NLAShmHiddenStatesConnector(ExampleHiddenStatesConnector):
        """Writes each finished capturing request's layer-K rows to ``capture_dir`` (see module doc)."""

        def __init__(self, vllm_config, role, kv_cache_config):
            # Skip the stock __init__ (thread pool, lock files, storage path); keep what its
            # inherited methods read.
            KVConnectorBase_V1.__init__(self, vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
            if vllm_config.speculative_config is None:
                raise ValueError(f"{CONNECTOR_NAME} needs the 'extract_hidden_states' speculative method")
            self._cache_kv_group_id = self._find_cache_kv_group_id(kv_cache_config)
            self._block_size = self._get_cache_block_size(vllm_config, kv_cache_config, self._cache_kv_group_id)
            self._capture_dir = self._kv_transfer_config.get_from_extra_config("capture_dir", None)
            if not self._capture_dir:
                raise ValueError(f"{CONNECTOR_NAME} needs kv_connector_extra_config.capture_dir")
            self.cache_layers: list[str] = []
            self._kv_cache = None
            self._is_tp_rank_zero = True
            self._pending: dict[str, PendingCapture] = {}  # scheduler side

        # -- scheduler side ----------------------------------------------------------------

        def get_num_new_matched_tokens(self, request, num_computed_tokens):
            return 0, False  # store-only

        def update_state_after_alloc(self, request, blocks, num_external_tokens):
            return None

        def build_connector_meta(self, scheduler_output):
            meta = CaptureMetadata(saves=list(self._pending.values()))
            self._pending.clear()
            return meta

        def request_finished(self, request, block_ids):
            params = request.kv_transfer_params or {}
            if not params.get(CAPTURE_PARAM):
                return False, None
            num_rows = rows_to_save(request.num_tokens, request.num_computed_tokens)
            if num_rows == 0 or not block_ids:
                return False, None  # never ran (aborted while waiting, or preempted to zero)
            path = capture_file(self._capture_dir, request.request_id)
            self._pending[request.request_id] = PendingCapture(
                req_id=request.request_id,
                path=path,
                block_ids=list(block_ids),
                num_rows=num_rows,
                token_ids=list(request.all_token_ids[:num_rows]),
            )
            # True: keep the blocks until the worker has copied the rows (next step).
            return True, {CAPTURE_PARAM: path, "num_rows": num_rows}

        # -- worker side -------------------------------------------------------------------

        def start_load_kv(self, *args, **kwargs):
            return None

        def wait_for_layer_load(self, layer_name):
            return None

        def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
            return None  # the cache-only layer already wrote the rows during the forward

        def wait_for_save(self):
            return None

        def get_finished(self, finished_req_ids):
            done: set[str] = set()
            if self.has_connector_metadata():
                meta = self._get_connector_metadata()
                if isinstance(meta, CaptureMetadata):
                    for save in meta.saves:
                        if self._is_tp_rank_zero:
                            self._write(save)
                        done.add(save.req_id)
            # A save arrives in the same step as its request's id in finished_req_ids (both come
            # from one schedule()), and the copy is synchronous, so the blocks can go at once.
            return (done or None), None

        def _write(self, save: PendingCapture) -> None:
            tmp = os.path.join(os.path.dirname(save.path), "." + os.path.basename(save.path) + ".tmp")
            try:
                assert self._kv_cache is not None, "register_kv_caches was not called"
                cache = self._kv_cache  # [num_blocks, num_states, block_size, d]
                slots = torch.tensor(block_slots(save.block_ids, self._block_size, save.num_rows), dtype=torch.long)
                slots = slots.to(cache.device)
                # A synchronous device->host copy between steps (on GPU it waits for the step in
                # flight; a request's rows are a few hundred KB, copied once, when it ends).
                with gpu_sync_allowed():
                    rows = cache[slots // self._block_size, 0, slots % self._block_size].to("cpu")  # [num_rows, d]
                tensors = {
                    "hidden_states": rows.contiguous(),
                    "token_ids": torch.tensor(save.token_ids, dtype=torch.long),
                }
                save_file(tensors, tmp, metadata={"request_id": save.req_id})
                os.replace(tmp, save.path)
            except Exception as e:  # never take the engine down over one request's rows
                logger.exception("capture of %s failed", save.req_id)
                _remove(tmp)
                try:
                    with open(save.path[: -len(_SUFFIX)] + _ERROR_SUFFIX, "w") as f:
                        f.write(f"{type(e).__name__}: {e}")
                except OSError:
                    pass

    NLAShmHiddenStatesConnector.__module__ = CONNECTOR_MODULE
    CaptureMetadata.__module__ = CONNECTOR_MODULE
    CaptureMetadata.__qualname__ = CaptureMetadata.__name__ = "CaptureMetadata"
    return NLAShmHiddenStatesConnector, CaptureMetadata


def __getattr__(name: str):
    if name in (CONNECTOR_NAME, "CaptureMetadata"):
        connector, meta = _build_connector_class()
        globals()[CONNECTOR_NAME] = connector
        globals()["CaptureMetadata"] = meta
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
