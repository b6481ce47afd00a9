"""Steering inside vLLM: the vector is added in the model, per token, with no per-request Python
in the compiled forward.

Three pieces, in the engine processes:

- **the model** (``install``, called by the capture class in ``row_store``): decoder block K+1
  becomes a thin subclass of its own class whose forward first adds ``|h| * u[t]`` to the
  residual (``h`` = hidden + residual, the stream after block K), reading ``u`` from a float32
  buffer ``[max tokens of a step, d]`` that lives on the model. The aux row the capture stores is
  taken before block K+1 runs, so explanations read the activation before the steering. The
  buffer has a fixed address, so a CUDA graph replays the same add with whatever the buffer
  holds; unsteered tokens read zeros and are left bit for bit as they were.
- **the scheduler** (``SchedulerSteering``, part of the capture connector): for every steered
  request scheduled in a step, which positions run (``num_computed_tokens`` before the step and
  the scheduled count) and their slots in the hidden-state cache group, plus the request's
  intervention the first time. Positions, not batch rows: what the scheduler knows.
- **the worker** (``WorkerSteering``): when the step's metadata is bound (inside the forward
  context, before the forward), finds each steered token's row in the flattened batch by its slot
  in the step's slot mapping, and writes ``u`` (``Intervention.rows``, the same function the
  reference engine uses) into the buffer; the rows it wrote last step are zeroed first.

Chunked prefill, preemption and prefix caching stay exact: ``u`` is a function of the request
and the position only, recomputed positions get it again, and steered requests carry a cache
salt of their steering fingerprint so their blocks are shared only with identically steered ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nla_serve.engines.vllm.capture.protocol import STEER_PARAM, block_slots, blocks_for


_buffer = None  # this process's model buffer (set by ``install``)


def install(model: Any, vllm_config: Any, capture_layer: int) -> bool:
    """Make block K+1 of ``model`` add the steering rows; False (nothing installed) where it cannot
    be: pipeline parallelism, or K the last block. ``capture_layer`` is K+1 (the aux layer id)."""
    global _buffer
    import torch
    from torch import nn

    text = vllm_config.model_config.hf_config.get_text_config()
    num_layers = int(text.num_hidden_layers)
    if vllm_config.parallel_config.pipeline_parallel_size > 1 or capture_layer >= num_layers:
        return False
    layers = next((m for name, m in model.named_modules()
                   if name.endswith("layers") and isinstance(m, nn.ModuleList) and len(m) == num_layers), None)
    if layers is None:
        return False
    block = layers[capture_layer]
    block.__class__ = steering_block_class(type(block))
    sched = vllm_config.scheduler_config
    comp = vllm_config.compilation_config
    rows = max(int(sched.max_num_batched_tokens), int(getattr(comp, "max_cudagraph_capture_size", None) or 0)) + 8
    # built under vLLM's device context: on the model's device; float32 whatever the model's dtype
    block.register_buffer("nla_steer_rows", torch.zeros(rows, int(text.hidden_size), dtype=torch.float32),
                          persistent=False)
    _buffer = block.nla_steer_rows
    return True


def buffer():
    return _buffer


def steering_block_class(base: type) -> type:
    """``base`` (a vLLM decoder block taking ``(positions, hidden_states, residual)``) that adds
    the steering rows to the residual stream it receives."""

    class Steered(base):
        def forward(self, positions, hidden_states, residual, *args, **kwargs):
            n = hidden_states.shape[0]
            stream = (hidden_states + residual).float()
            residual = residual + (stream.norm(dim=-1, keepdim=True) * self.nla_steer_rows[:n]).to(residual.dtype)
            return super().forward(positions, hidden_states, residual, *args, **kwargs)

    Steered.__name__ = Steered.__qualname__ = "NLASteered" + base.__name__
    return Steered


@dataclass
class SteerPiece:
    """The positions ``start .. start+len(slots)-1`` of one steered request that run this step,
    their hidden-state-group slots, and the intervention (``wire``) the first time it is sent."""

    req_id: str
    start: int
    slots: list[int]
    wire: dict | None = None


class SchedulerSteering:
    """Scheduler-process half (mixed into the capture connector)."""

    def _steer_sched_init(self) -> None:
        self._steered: dict[str, list] = {}  # req_id -> [request, wire or None once sent]

    def _steer_new(self, request) -> None:
        wire = (request.kv_transfer_params or {}).get(STEER_PARAM)
        if wire is not None:
            self._steered[request.request_id] = [request, wire]

    def _steer_pieces(self, scheduler_output) -> list[SteerPiece]:
        pieces = []
        if self._kv_cache_manager is None:
            return pieces
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            entry = self._steered.get(req_id)
            if entry is None or n <= 0:
                continue
            request, wire = entry
            start = request.num_computed_tokens  # the step's first position (advanced after this call)
            table = self._kv_cache_manager.get_block_ids(req_id)[self._cache_kv_group_id]
            slots = block_slots(blocks_for(table, self._block_size, start, start + n), self._block_size, start, start + n)
            pieces.append(SteerPiece(req_id, start, slots, wire))
            entry[1] = None  # the worker keeps it from now on
        return pieces

    def _steer_finished(self, request) -> None:
        self._steered.pop(request.request_id, None)


class WorkerSteering:
    """Worker-process half: fill the model's buffer for the step about to run."""

    def _steer_worker_init(self, rows_layer: str) -> None:
        self._steer_rows_layer = rows_layer
        self._steer_known: dict = {}  # req_id -> Intervention
        self._steer_dirty = None  # buffer rows written last step

    def _steer_fill(self, pieces: list[SteerPiece]) -> None:
        import torch
        from vllm.forward_context import get_forward_context

        from nla_serve.steering.intervention import Intervention

        buf = buffer()
        if buf is None:
            if pieces:
                raise RuntimeError("steered requests reached a model without steering installed")
            return
        if self._steer_dirty is not None:
            buf[self._steer_dirty] = 0.0
            self._steer_dirty = None
        if not pieces:
            return
        slot_mapping = get_forward_context().slot_mapping
        if not isinstance(slot_mapping, dict):
            raise RuntimeError("steering does not support micro-batched steps (a list of slot mappings)")
        step_slots = slot_mapping[self._steer_rows_layer]
        order = torch.argsort(step_slots)
        ordered = step_slots[order]
        rows, wanted = [], []
        for piece in pieces:
            if piece.wire is not None:
                self._steer_known[piece.req_id] = Intervention.from_wire(piece.wire)
            intervention = self._steer_known[piece.req_id]
            rows.append(intervention.rows(range(piece.start, piece.start + len(piece.slots))))
            wanted.extend(piece.slots)
        wanted_t = torch.tensor(wanted, dtype=step_slots.dtype, device=step_slots.device)
        at = torch.searchsorted(ordered, wanted_t).clamp_max(ordered.numel() - 1)
        if not torch.equal(ordered[at], wanted_t):
            raise RuntimeError("a steered token's slot is not in this step's slot mapping")
        index = order[at]
        buf[index] = torch.cat(rows).to(buf.device)
        self._steer_dirty = index

    def _steer_forget(self, finished_req_ids) -> None:
        for req_id in finished_req_ids or ():
            self._steer_known.pop(req_id, None)
