"""The engine processes' end of activation capture: a KV connector that writes the layer-K rows
engine steps settle, for every capturing request at once, one file per step, and each request's
rest when it finishes (see ``protocol`` for the design).

vLLM's scheduler and worker processes import this module by path (``kv_connector_module_path``);
the connector class is built on first access (module ``__getattr__``) so that importing the module
does not need vLLM.

Shape: the connector must subclass vLLM's hidden-states connector, which exists only once vLLM is
imported, so its behaviour lives in two plain classes defined here and the vLLM class is put
together from them on first access (``_build_classes``): ``_SchedulerSide`` (the scheduler process:
which rows each step settled and which blocks hold them) and ``_WorkerSide`` (the worker: copy
those rows out of the blocks and write the step file). vLLM makes one connector object per role;
each uses its own side.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from nla_serve.engines.vllm.capture.steering import SchedulerSteering, SteerPiece, WorkerSteering
from nla_serve.engines.vllm.capture.protocol import (CAPTURE_PARAM, CONNECTOR_MODULE, CONNECTOR_NAME, ERROR_SUFFIX,
                                                     block_slots, blocks_for, rows_to_save, settled_rows, step_file,
                                                     write_error, write_step)


@dataclass
class PendingCapture:
    """Rows ``start .. end-1`` of one request to write: sent from the scheduler to the worker.
    ``final`` is the last piece (the request finished and its blocks wait for the copy)."""

    req_id: str
    block_ids: list[int]  # the hidden-state group's blocks holding start..end-1 (``blocks_for``)
    start: int
    end: int
    token_ids: list[int]  # the tokens of those rows
    final: bool = True


class _SchedulerSide(SchedulerSteering):
    """What the connector does in the scheduler process: per capturing request, how many rows it
    has sent; each step, the slots of the rows earlier steps settled, and the rest of every request
    that finished, as the step's connector metadata; and the positions of steered requests that
    run in the step (``steering``)."""

    def bind_kv_cache_manager(self, kv_cache_manager):
        super().bind_kv_cache_manager(kv_cache_manager)
        self._kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False  # store-only

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        return None

    def on_new_request(self, request):
        if (request.kv_transfer_params or {}).get(CAPTURE_PARAM):
            self._live[request.request_id] = [request, 0]
        self._steer_new(request)

    def build_connector_meta(self, scheduler_output):
        saves = list(self._pending.values())
        self._pending.clear()
        if self._kv_cache_manager is not None:
            for req_id, entry in self._live.items():
                request, sent = entry
                end = settled_rows(request.num_tokens, request.num_computed_tokens,
                                   getattr(request, "num_in_flight_tokens", 0))
                if end <= sent:
                    continue  # nothing new (or preempted and still recomputing what was sent)
                table = self._kv_cache_manager.get_block_ids(req_id)[self._cache_kv_group_id]
                saves.append(PendingCapture(req_id, blocks_for(table, self._block_size, sent, end), sent, end,
                                            list(request.all_token_ids[sent:end]), final=False))
                entry[1] = end
        return _build_classes()[1](saves=saves, steer=self._steer_pieces(scheduler_output))

    def request_finished(self, request, block_ids):
        self._steer_finished(request)
        params = request.kv_transfer_params or {}
        entry = self._live.pop(request.request_id, None)
        if not params.get(CAPTURE_PARAM):
            return False, None
        sent = entry[1] if entry is not None else 0
        num_rows = rows_to_save(request.num_tokens, request.num_computed_tokens)
        if num_rows == 0 or not block_ids:
            if sent == 0:
                return False, None  # never ran (aborted while waiting, or preempted to zero)
            num_rows = sent  # preempted after parts were sent: nothing more to copy
        start = min(sent, num_rows)
        self._pending[request.request_id] = PendingCapture(
            req_id=request.request_id,
            block_ids=blocks_for(block_ids or [], self._block_size, start, num_rows),
            start=start,
            end=num_rows,
            token_ids=list(request.all_token_ids[start:num_rows]),
        )
        # True: keep the blocks until the worker has copied the rows (next step).
        return True, {CAPTURE_PARAM: True, "num_rows": num_rows}


class _WorkerSide(WorkerSteering):
    """What the connector does in the worker process: before the step's forward, fill the steering
    rows (``steering``); after it, copy the rows the metadata names out of the paged blocks with
    one gather and write them as one step file."""

    def bind_connector_metadata(self, connector_metadata):
        super().bind_connector_metadata(connector_metadata)
        try:  # called inside the step's forward context, before the forward
            self._steer_fill(getattr(connector_metadata, "steer", None) or [])
        except Exception:  # never take the engine down: the step runs unsteered, loudly
            from vllm.logger import init_logger

            init_logger(CONNECTOR_MODULE).exception("steering of step %d failed; it runs unsteered", self._seq + 1)

    def start_load_kv(self, *args, **kwargs):
        return None

    def wait_for_layer_load(self, layer_name):
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        return None  # the cache-only layer already wrote the rows during the forward

    def wait_for_save(self):
        return None

    def get_finished(self, finished_req_ids):
        self._steer_forget(finished_req_ids)
        done: set[str] = set()
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, _build_classes()[1]) and meta.saves:
                if self._is_tp_rank_zero:
                    self._write_step(meta.saves)
                done.update(save.req_id for save in meta.saves if save.final)
        # A save arrives in the same step as its request's id in finished_req_ids (both come
        # from one schedule()), and the copy is synchronous, so the blocks can go at once.
        return (done or None), None

    def _write_step(self, saves: list[PendingCapture]) -> None:
        """One file for the step: every request's rows, back to back, and which are whose."""
        import torch
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed

        self._seq += 1
        path = step_file(self._capture_dir, self._seq)
        try:
            assert self._kv_cache is not None, "register_kv_caches was not called"
            cache = self._kv_cache  # [num_blocks, num_states, block_size, d]
            slots = [slot for save in saves
                     for slot in block_slots(save.block_ids, self._block_size, save.start, save.end)]
            slots = torch.tensor(slots, dtype=torch.long).to(cache.device)
            # A synchronous device->host copy between steps (on GPU it waits for the step in
            # flight: the GPU smoke script measures it; a non-blocking copy is the next step).
            with gpu_sync_allowed():
                rows = cache[slots // self._block_size, 0, slots % self._block_size].to("cpu")  # [sum rows, d]
            write_step(path, [(save.req_id, save.start, save.end - save.start, save.final) for save in saves],
                       rows, [t for save in saves for t in save.token_ids])
        except Exception as e:  # never take the engine down over captured rows: their requests fail
            from vllm.logger import init_logger

            init_logger(CONNECTOR_MODULE).exception("capture of step %d failed", self._seq)
            try:
                write_error(step_file(self._capture_dir, self._seq, ERROR_SUFFIX),
                            [(save.req_id, save.final) for save in saves], f"{type(e).__name__}: {e}")
            except OSError:
                pass  # no note either: those choices time out with a clear error


@functools.cache
def _build_classes() -> tuple[type, type]:
    """The connector (a subclass of vLLM's hidden-states connector with both sides above) and its
    metadata class; built once, on first access to ``CONNECTOR_NAME`` (needs vLLM).

    Reused from the stock class: locating the hidden-state KV group and its block size,
    ``register_kv_caches`` (finds the cache-only layer's buffer, views
    ``[num_blocks, num_states, block_size, d]``), the layout it needs and ``get_finished_count``
    (only tensor-parallel rank 0 writes).
    """
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                   KVConnectorRole)

    from nla_serve.engines.vllm.capture.row_store import ROWS_LAYER
    from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
        ExampleHiddenStatesConnector,
    )

    @dataclass
    class CaptureMetadata(KVConnectorMetadata):
        saves: list[PendingCapture] = field(default_factory=list)
        steer: list[SteerPiece] = field(default_factory=list)

    class NLAShmHiddenStatesConnector(_SchedulerSide, _WorkerSide, ExampleHiddenStatesConnector):
        """Writes the capturing requests' layer-K rows to ``capture_dir``, one file per step (see module doc)."""

        def __init__(self, vllm_config, role, kv_cache_config):
            # Skip the stock __init__ (thread pool, lock files, storage path); keep what its
            # inherited methods read.
            KVConnectorBase_V1.__init__(self, vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
            embedded = getattr(vllm_config.model_config.hf_config, "nla_capture_layer", None) is not None
            if vllm_config.speculative_config is None and not embedded:
                raise ValueError(f"{CONNECTOR_NAME} needs a capturing model (row_store) or the "
                                 "'extract_hidden_states' speculative method")
            self._cache_kv_group_id = self._find_cache_kv_group_id(kv_cache_config)
            self._block_size = self._get_cache_block_size(vllm_config, kv_cache_config, self._cache_kv_group_id)
            self._capture_dir = self._kv_transfer_config.get_from_extra_config("capture_dir", None)
            if not self._capture_dir:
                raise ValueError(f"{CONNECTOR_NAME} needs kv_connector_extra_config.capture_dir")
            self.cache_layers: list[str] = []
            self._kv_cache = None
            self._is_tp_rank_zero = True
            self._pending: dict[str, PendingCapture] = {}  # scheduler side: finished, to write
            self._live: dict[str, list] = {}  # scheduler side: running capturing request -> [request, sent]
            self._kv_cache_manager = None
            self._seq = 0  # worker side: step files written (their names sort in step order)
            text = vllm_config.model_config.hf_config.get_text_config()
            if role == KVConnectorRole.SCHEDULER:
                SchedulerSteering._steer_sched_init(self)
            else:
                WorkerSteering._steer_worker_init(self, ROWS_LAYER.format(index=text.num_hidden_layers))

    NLAShmHiddenStatesConnector.__module__ = CONNECTOR_MODULE
    CaptureMetadata.__module__ = CONNECTOR_MODULE
    CaptureMetadata.__qualname__ = CaptureMetadata.__name__ = "CaptureMetadata"
    return NLAShmHiddenStatesConnector, CaptureMetadata


def __getattr__(name: str):
    if name in (CONNECTOR_NAME, "CaptureMetadata"):
        connector, meta = _build_classes()
        globals()[CONNECTOR_NAME] = connector
        globals()["CaptureMetadata"] = meta
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
