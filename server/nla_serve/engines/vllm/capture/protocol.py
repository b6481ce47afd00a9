"""Layer-K activations out of vLLM: what the engine processes' connector and the API process's reader
agree on (the engine configuration, request ids and file names, the step file format), and the design
of the capture as a whole.

How activations are captured
    vLLM v1 has no "return hidden states" request option. Two methods store the rows; this module
    and the connector serve both. The default for Llama/Qwen2/Qwen3 is the draft-free row store
    (``row_store``: the target model itself writes its layer-K rows into a cache-only layer,
    no draft token). The fallback, described here, starts the engine with the
    ``extract_hidden_states`` speculative method (``eagle_aux_hidden_state_layer_ids=[K+1]``): on
    every step the target model also emits the residual stream after decoder block K for every token
    it fed, and a cache-only "draft" layer stores those rows in a KV-cache group of their own, at the
    same slots as the tokens' ordinary KV. So a request's rows live in its paged blocks exactly like
    its KV, which is what keeps them right under continuous batching, chunked prefill (each chunk
    writes its own slots), preemption (recomputed with the blocks) and prefix-cache hits (the cached
    blocks already hold the rows for the shared prefix; block hashes cover the tokens, so a hit means
    the same tokens at the same positions). ``NLAShmHiddenStatesConnector`` (``connector``) is
    a KV connector that gathers the capturing requests' rows from their blocks in the worker, step
    by step (below), and writes them into a per-engine directory under ``/dev/shm``: one
    safetensors file per engine step for all capturing requests in it (written to a hidden
    temporary name, then renamed, so a reader never sees half a file). The API process
    (``CaptureDir``) reads each file once, files its rows under the choices they belong to, and
    deletes it. The stock ``ExampleHiddenStatesConnector`` writes once per finished request, with
    pinned memory, CUDA streams and a writer thread pool, which crash on CPU; this one copies
    synchronously between engine steps (on GPU that waits for the step in flight: a sync to remove
    there), the rows each step settled, a few KB per running request.

When they arrive
    While the request runs. Each engine step, the scheduler side of the connector sends, for every
    running capturing request, the slots of the rows that earlier steps settled since the last
    send (``settled_rows``: up to the tokens computed before this step, never the last sampled
    token), and for every request that finished, the rest of its rows (to ``P+G-2``) marked as its
    last piece; the worker copies them all out of the paged blocks after the step's forward with
    one gather and writes one ``<step>.step`` file. So rows reach the API process one engine step
    behind the tokens, prompt rows included (the first step after prefill), and because they are
    read out of the same blocks as before, they stay exact under chunked prefill, prefix-cache hits
    (cached blocks hold their rows), preemption (a preempted request's computed count drops and
    rises again; nothing is re-sent) and n>1 (each child is its own request). The reader hands
    them on with the choice's next update, only up to the tokens it has received (the engine may
    be a step ahead). One file per step, not one per request and step: one write and one read per
    step however many requests capture (docs/benchmarks.md). A step the worker could not write
    leaves ``<step>.error`` naming its requests, which then fail with that reason instead of
    waiting.

What the last position gets
    Nothing: the last sampled token is never fed through the model, so it has no row (rows are
    ``P + G - 1``). Rows are the model's own dtype on the wire (bf16 stays bf16 in shared memory) and
    become float32 in the reader.

What it costs
    Both methods add ``d_model`` KV elements per token for the row store (for Qwen2.5-7B about 12%
    on top of its KV). The speculative method also carries one extra "draft" token per running
    request per decode step and occupies the speculative slot (no real speculative decoding beside
    it); when the model repeats its last token the "draft" is accepted and that token comes free.
    Every request pays the compute, capturing or not; only capturing requests
    (``kv_transfer_params = {"nla_capture": True}``) pay the copies (a few KB a step) and the files.
    An engine built without ``capture_layer`` pays nothing. What each method costs in tokens/s was
    measured with ``bench/capture_overhead.py``: docs/benchmarks.md has the figures. On CPU a
    capturing engine reserves the cores a plain one does (``engines/vllm/args.py``,
    ``_reserved_cpus_env``): vLLM reserves one more for any KV connector, which this one does not
    need.

Request ids
    ``AsyncLLM`` makes the engine-side id ``"<id>-<8 random chars>"``, and the n>1 children
    ``"<index>_<id>-<8 chars>"``. ``vllm_request_id`` makes ``<id>`` unique and free of ``_`` and
    ``-`` so that ``choice_of`` can tell which choice a row belongs to from its engine-side id alone.

Aborts and stop strings
    The engine core cannot tell a client abort from the abort the API process sends when it sees a
    stop string (stop strings are matched on detokenized text, outside the engine core): both arrive
    as aborts, so rows are sent for every capturing request that had computed anything. The reader
    hands a stop-string finish its rows like any other (dropping rows past the kept tokens) and
    drops the rows of real aborts as they arrive (``discard``); ``close`` removes the directory.

Where the code lives
    This module holds what both sides agree on: the engine configuration, request ids and file
    names and the step file format (no vLLM). ``reader`` is the API process's end (read each step
    file once, hand rows to their choices); ``connector`` is the engine processes' end (the KV
    connector vLLM loads by module path). Neither imports the other. ``row_store`` (the embedded
    method's model classes) is loaded in every vLLM process by its plugin entry point.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import uuid
from typing import Any

CONNECTOR_NAME = "NLAShmHiddenStatesConnector"
CONNECTOR_MODULE = "nla_serve.engines.vllm.capture.connector"  # imported by vLLM's engine processes
CAPTURE_PARAM = "nla_capture"  # key in a request's kv_transfer_params that asks for its rows
STEER_PARAM = "nla_steer"  # ... that carries its steering (Intervention.as_wire; see ``steering``)
STEP_SUFFIX = ".step"  # the rows one engine step settled, for every capturing request in it
ERROR_SUFFIX = ".error"  # a step whose rows could not be written: which requests, and why


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


def capture_extra_args(capture: bool = True, steering: dict | None = None) -> dict[str, Any] | None:
    """``SamplingParams.extra_args`` of a request whose rows should be delivered (``capture``)
    and/or that is steered (``steering``, ``Intervention.as_wire``; see ``steering``)."""
    params: dict[str, Any] = {}
    if capture:
        params[CAPTURE_PARAM] = True
    if steering is not None:
        params[STEER_PARAM] = steering
    return {"kv_transfer_params": params} if params else None


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


def step_file(capture_dir: str, seq: int, suffix: str = STEP_SUFFIX) -> str:
    """Where the connector writes the ``seq``-th step's rows. Names sort in step order; the
    writer's pid keeps the engines of a data-parallel group (one folder, a counter each) apart,
    and order only matters within one of them (a request runs in one)."""
    return os.path.join(capture_dir, f"{seq:012d}.{os.getpid()}{suffix}")


def write_step(path: str, pieces: list[tuple[str, int, int, bool]], rows, token_ids: list[int]) -> None:
    """Write one step file: ``pieces`` are (engine-side request id, first position, row count,
    last piece?) in the order their rows (a ``[sum counts, d]`` tensor) and tokens are stacked."""
    import json

    import torch

    tensors = {
        "hidden_states": rows.contiguous(),
        "token_ids": torch.tensor(token_ids, dtype=torch.long),
        "pieces": torch.tensor([[start, count, int(final)] for _, start, count, final in pieces],
                               dtype=torch.long).reshape(-1, 3),
    }
    _write_whole(path, *_safetensors_buffers(tensors, {"ids": json.dumps([req_id for req_id, *_ in pieces])}))


# torch dtype name -> safetensors dtype name, for what step files hold
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64"}


def _safetensors_buffers(tensors: dict, metadata: dict[str, str]) -> list:
    """``tensors`` (contiguous CPU tensors) as the buffers of a safetensors file, in order: the
    8-byte little-endian header size, the JSON header, then each tensor's raw bytes.

    Laid out here rather than by ``safetensors.torch.save``, which spends several times as long on
    a step file's few KB (docs/benchmarks.md), inside the engine's step (the worker writes
    synchronously). The reader (and any safetensors tool) reads the result with
    ``safetensors.torch.load``. The format is little-endian: on a big-endian host safetensors' own
    writer is used (it swaps the bytes)."""
    import json
    import sys

    import torch

    if sys.byteorder != "little":
        from safetensors.torch import save

        return [save(tensors, metadata=metadata)]
    header: dict = {"__metadata__": metadata}
    at = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [at, at + nbytes]}
        at += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return [len(head).to_bytes(8, "little"), head,
            *(memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in tensors.values() if t.numel())]


def write_error(path: str, pieces: list[tuple[str, bool]], error: str) -> None:
    """Write the note of a step whose rows could not be written: its requests (engine-side id,
    last piece?) fail with ``error`` instead of waiting for rows."""
    import json

    _write_whole(path, json.dumps({"ids": [req_id for req_id, _ in pieces],
                                   "finals": [final for _, final in pieces], "error": error}).encode())


def _write_whole(path: str, *buffers) -> None:
    """``buffers`` one after another to ``path`` under a hidden name, then renamed, so a reader
    never sees half of the file."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            size = sum(memoryview(b).nbytes for b in buffers)
            written = os.writev(fd, buffers)  # one system call for all of them
            if written != size:  # only a full /dev/shm does this: the caller's error path takes it
                raise OSError(f"short write of {path}: {written} of {size} bytes")
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        remove_file(tmp)


def choice_of(internal_id: str) -> tuple[str, int]:
    """(``vllm_request_id``, choice index) of an engine-side request id: ``key-xxxxxxxx`` (n == 1)
    is choice 0 of ``key``; ``3_key-xxxxxxxx`` (a child of an n > 1 request) is choice 3."""
    head, sep, rest = internal_id.partition("_")
    child = bool(sep) and head.isdigit() and "-" in rest
    return (rest if child else internal_id).rsplit("-", 1)[0], (int(head) if child else 0)


def settled_rows(num_tokens: int, num_computed_tokens: int, num_in_flight_tokens: int = 0) -> int:
    """Rows of a running request that earlier engine steps have written and no later step will
    change, seen from the scheduler before this step's tokens are counted: every computed position
    except the last sampled token (never fed) and tokens of steps still in flight (async
    scheduling counts them optimistically)."""
    return max(0, min(num_tokens - 1, num_computed_tokens - num_in_flight_tokens))


def rows_to_save(num_tokens: int, num_computed_tokens: int) -> int:
    """Rows a finished request holds: every computed position except the last sampled token.

    ``num_tokens`` is prompt + output; the last output token was never fed. An abort during prefill
    holds only the computed part of the prompt.
    """
    return max(0, min(num_tokens - 1, num_computed_tokens))


def blocks_for(block_ids: list[int], block_size: int, start: int, end: int) -> list[int]:
    """The part of a request's block table that holds positions ``start .. end-1`` (what the
    scheduler sends the worker: a few blocks per step, not the whole table)."""
    if end <= start:
        return []  # nothing to copy (a last piece that only marks the end)
    need = math.ceil(end / block_size)
    if need > len(block_ids):
        raise ValueError(f"{end} rows need {need} blocks of {block_size}; the request has {len(block_ids)}")
    return list(block_ids[start // block_size:need])


def block_slots(block_ids: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Flat KV slots of positions ``start .. end-1``, given the blocks ``blocks_for`` cut for them."""
    first = start // block_size
    return [block_ids[p // block_size - first] * block_size + p % block_size for p in range(start, end)]


class CaptureError(RuntimeError):
    """Rows that should have arrived did not, or do not fit the request."""


def remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
