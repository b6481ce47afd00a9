"""The verbalizer as a fleet of stock vLLM OpenAI servers (``--verbalizer-url``).

Explanations cost far more decode work than the tokens they explain, so their capacity must scale
on its own. Each backend is plain ``vllm serve AV --enable-prompt-embeds`` (no plugin of ours);
this engine speaks to them over ``/v1/completions`` with ``prompt_embeds`` and looks like any other
engine to the verbalizer, so the worker, the cache and the reconstructor (which stays in the
server: it is one forward pass) do not change.

Exactness. In-process, vLLM's mixed mode embeds the template's tokens itself and takes our fp32
marker row, cast once to the model dtype. Here the whole prompt goes as embeddings, so the token
rows are read from the AV's own embedding matrix (in the model dtype, then widened to fp32, which is
lossless) and the marker row is the same fp32 vector; vLLM casts the tensor once to its dtype, which
gives back exactly the rows it would have embedded. Gemma scales token embeddings by sqrt(hidden)
in the model dtype, and so do we (never the marker row, as the NLA recipe requires); for that the
dtype here (``--nla-dtype``) must be the backends' ``--dtype``.

Routing and faults. Each job goes to the healthy backend with the fewest jobs in flight. A backend
that cannot be reached, answers 5xx, or exceeds ``timeout_s`` is marked down and the job is retried
on another one it has not tried. When none is left, the job waits up to two probe rounds for any
backend to pass a probe and gets one more round (a busy server may only have been slow to accept);
after that it fails with every backend's reason. A
4xx is the job's own fault (e.g. too long for the backend's context) and is not retried. Backends are
probed (``/v1/models``) every ``health_interval_s``; a down backend comes back when a probe passes.
The generation never waits on any of this: failures become ``failed`` explanations.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

from nla_serve.aio import cancel_and_wait
from nla_serve.engine_config import EngineSettings, RemoteSettings
from nla_serve.engines.base import check_prompt, refuse_adapter, refuse_intervention
from nla_serve.errors import ClientError, UnavailableError
from nla_serve.types import Adapter, Intervention, Prompt, SamplingOptions, StepOutput

if TYPE_CHECKING:
    import httpx
    import torch

log = logging.getLogger("nla_serve.remote_verbalizer")

_DTYPES = ("float32", "bfloat16", "float16")


class BackendFailure(Exception):
    """This backend could not do the job (unreachable, 5xx, timeout): try another."""


@dataclass
class Backend:
    url: str
    up: bool = False
    in_flight: int = 0
    model: str | None = None  # the name it serves the AV under (from /v1/models unless configured)
    max_model_len: int | None = None
    error: str | None = "not probed yet"
    served: int = 0  # jobs completed here

    def state(self) -> dict:
        return {"url": self.url, "up": self.up, "in_flight": self.in_flight, "model": self.model,
                "served": self.served, "error": None if self.up else self.error}


class EmbeddingTable:
    """Rows of the AV's input embedding matrix, read from its safetensors on first use and kept
    (the template is the same few dozen ids for every job)."""

    def __init__(self, folder: Path, dtype: "torch.dtype", scale: float | None):
        self.folder = folder
        self.dtype = dtype
        self.scale = scale  # Gemma: sqrt(hidden), applied in the model dtype; None elsewhere
        self.name, self.file = self._locate()
        self.rows: dict[int, "torch.Tensor"] = {}

    def _locate(self) -> tuple[str, Path]:
        from safetensors import safe_open

        found = []
        for path in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                found += [(k, path) for k in f.keys() if k.endswith("embed_tokens.weight")]
        if len(found) != 1:
            raise UnavailableError(
                f"the AV folder {self.folder} must hold exactly one '*embed_tokens.weight' tensor to build prompt "
                f"embeddings for --verbalizer-url; found {[k for k, _ in found] or 'none'}")
        return found[0]

    def embed(self, ids: list[int]) -> "torch.Tensor":
        """[len(ids), d] float32, each row exactly what the backend's embedding layer gives."""
        import torch
        from safetensors import safe_open

        missing = sorted(set(ids) - self.rows.keys())
        if missing:
            with safe_open(str(self.file), "pt") as f:
                table = f.get_slice(self.name)
                vocab = table.get_shape()[0]
                for i in missing:
                    if not 0 <= i < vocab:
                        raise ClientError(f"token id {i} is outside the AV's vocabulary of {vocab}")
                    row = table[i:i + 1][0].to(self.dtype)
                    if self.scale is not None:
                        row = row * torch.tensor(self.scale, dtype=self.dtype)
                    self.rows[i] = row.to(torch.float32)
        return torch.stack([self.rows[i] for i in ids])


def encode_embeds(embeds: "torch.Tensor") -> str:
    """vLLM's ``prompt_embeds`` wire form: base64 of ``torch.save``."""
    import torch

    buf = io.BytesIO()
    torch.save(embeds.contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def av_config(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    return cfg.get("text_config") or cfg  # multimodal checkpoints (Gemma-3) nest the language model's


class RemoteVerbalizerEngine:
    """A ``TargetEngine`` for the verbalizer only: prompts with one injected row, no capture."""

    constrains_decoding = False  # the verbalizer never asks for structured outputs

    def __init__(self, settings: EngineSettings) -> None:
        if settings.remote is None:
            raise ValueError("a remote engine needs settings.remote (the backend URLs)")
        self.settings = settings
        self.remote: RemoteSettings = settings.remote
        self.backends = [Backend(u, model=self.remote.model) for u in self.remote.urls]
        self.tokenizer = None
        self.hidden_size = 0
        self.num_layers = 0
        self.max_model_len = 0
        self.dtype = None
        self.table: EmbeddingTable | None = None
        self._client: "httpx.AsyncClient | None" = None
        self._health: asyncio.Task | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        import httpx
        import torch
        from transformers import AutoTokenizer

        folder = Path(self.settings.model)
        cfg = await asyncio.to_thread(av_config, folder)
        self.hidden_size = int(cfg["hidden_size"])
        self.num_layers = int(cfg.get("num_hidden_layers", 0))
        name = self.settings.dtype if self.settings.dtype != "auto" else (cfg.get("torch_dtype") or cfg.get("dtype")
                                                                          or "float32")
        self.dtype = getattr(torch, str(name) if str(name) in _DTYPES else "float32")
        gemma = str(cfg.get("model_type", "")).startswith("gemma")
        self.table = await asyncio.to_thread(EmbeddingTable, folder, self.dtype,
                                             math.sqrt(self.hidden_size) if gemma else None)
        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(folder))
        self.max_model_len = self.settings.max_model_len or int(cfg.get("max_position_embeddings", 4096))
        headers = {"Authorization": f"Bearer {self.remote.api_key}"} if self.remote.api_key else {}
        # the per-request timeout is the job's budget on one backend; a busy server can be slow to
        # accept, so connecting gets up to 30 s (a refused connection fails at once anyway)
        self._client = httpx.AsyncClient(headers=headers,
                                         timeout=httpx.Timeout(self.remote.timeout_s,
                                                               connect=min(30.0, self.remote.timeout_s)),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        await asyncio.gather(*(self._probe(b) for b in self.backends))
        up = [b.url for b in self.backends if b.up]
        log.info("verbalizer fleet: %d of %d backends up (%s)%s", len(up), len(self.backends), ", ".join(up) or "none",
                 "" if up else "; explanations fail until one answers: " + self.describe_down())
        self._health = asyncio.create_task(self._watch(), name="nla-verbalizer-fleet-health")

    @property
    def alive(self) -> bool:
        # The fleet is never restarted in-process: backends are watched one by one (see _watch).
        return True

    def in_flight(self) -> dict[str, int]:
        return {"requests": sum(b.in_flight for b in self.backends)}

    def fleet_state(self) -> list[dict]:
        return [b.state() for b in self.backends]

    def describe_down(self) -> str:
        return "; ".join(f"{b.url}: {b.error}" for b in self.backends if not b.up)

    async def abort(self, request_id: str) -> None:
        """Nothing to do: a cancelled job closes its HTTP request, and vLLM aborts on disconnect."""

    async def shutdown(self) -> None:
        await cancel_and_wait(self._health)
        if self._client is not None:
            await self._client.aclose()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.remote.health_interval_s)
            await asyncio.gather(*(self._probe(b) for b in self.backends))

    async def _probe(self, b: Backend) -> None:
        """Up when ``/v1/models`` answers and serves our model (or any, when none is named)."""
        try:
            r = await self._client.get(f"{b.url}/v1/models", timeout=5.0)
            if r.status_code != 200:
                raise BackendFailure(f"/v1/models answered {r.status_code}: {r.text[:200]}")
            models = {m["id"]: m for m in r.json().get("data", [])}
            name = self.remote.model or next(iter(models), None)
            if name not in models:
                raise BackendFailure(f"it does not serve {name!r} (it serves {sorted(models)})")
        except Exception as e:  # anything: this backend is not usable now
            was_up = b.up
            b.up, b.error = False, describe(e)
            if was_up:
                log.warning("verbalizer backend %s is down: %s", b.url, b.error)
            return
        if not b.up:
            log.info("verbalizer backend %s is up (model %s)", b.url, name)
        b.model, b.max_model_len = name, models[name].get("max_model_len")
        b.up, b.error = True, None

    def _pick(self, tried: set[str]) -> Backend | None:
        live = [b for b in self.backends if b.up and b.url not in tried]
        return min(live, key=lambda b: b.in_flight) if live else None

    def _payload(self, prompt: Prompt, o: SamplingOptions, model: str) -> dict:
        embeds = self.table.embed(prompt.token_ids)  # [P, d] float32
        if prompt.inject_at is not None:
            row = prompt.inject_row.detach().to("cpu")
            if tuple(row.shape) != (self.hidden_size,):
                raise ClientError(f"inject_row has shape {tuple(row.shape)}; expected ({self.hidden_size},)")
            embeds[prompt.inject_at] = row.float()
        body = {"model": model, "prompt_embeds": encode_embeds(embeds), "max_tokens": o.max_tokens,
                "temperature": o.temperature, "top_p": o.top_p, "stop": list(o.stop) or None,
                "stop_token_ids": list(o.stop_token_ids) or None, "ignore_eos": o.ignore_eos,
                "include_stop_str_in_output": o.include_stop_str_in_output, "return_token_ids": True}
        if o.top_k > 0:
            body["top_k"] = o.top_k
        if o.seed is not None:
            body["seed"] = o.seed
        return {k: v for k, v in body.items() if v is not None}

    async def generate(self, prompt: Prompt, options: SamplingOptions, request_id: str,
                       capture: bool = False, intervention: Intervention | None = None,
                       adapter: Adapter | None = None) -> AsyncIterator[StepOutput]:
        """One finished update per job (the backend answers whole). Raises ``UnavailableError``
        when no backend could take it and ``ClientError`` when a backend refused the job itself
        (or a steering ``intervention``, which stock vLLM servers cannot apply)."""
        refuse_intervention(intervention, "remote verbalizer")
        refuse_adapter(adapter, "remote verbalizer")
        if options.n != 1:
            raise ClientError("the verbalizer fleet takes one choice per job")
        check_prompt(prompt, options, self.max_model_len)
        tried: set[str] = set()
        reasons: list[str] = []
        second_round = False
        while True:
            b = self._pick(tried)
            if b is None and not second_round:
                # Every backend failed or is down. A busy one may only have been slow to accept: wait
                # for the probes to find one up again (two probe rounds), then give the job one more round.
                second_round = True
                if await self._wait_for_any_up(2 * self.remote.health_interval_s + 5.0):
                    tried.clear()
                    continue
            if b is None:
                down = [f"{x.url}: {x.error}" for x in self.backends if not x.up and x.url not in tried]
                raise UnavailableError("no verbalizer backend could take the explanation (" +
                                       "; ".join(reasons + down) + ")")
            tried.add(b.url)
            try:
                choice = await self._send(b, self._payload(prompt, options, b.model), request_id)
            except BackendFailure as e:
                reasons.append(f"{b.url}: {e}")
                if b.up:
                    log.warning("verbalizer backend %s failed a job, marked down until a probe passes: %s", b.url, e)
                b.up, b.error = False, str(e)
                continue
            yield StepOutput(index=0, token_ids=list(choice.get("token_ids") or []), text=choice.get("text") or "",
                             finished=True, finish_reason=choice.get("finish_reason"),
                             num_prompt_tokens=len(prompt.token_ids))
            return

    async def _wait_for_any_up(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not any(b.up for b in self.backends):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def _send(self, b: Backend, body: dict, request_id: str) -> dict:
        b.in_flight += 1
        try:
            r = await self._client.post(f"{b.url}/v1/completions", json=body,
                                        headers={"X-Request-Id": request_id})
        except Exception as e:  # transport errors and timeouts: the backend's fault, not the job's
            raise BackendFailure(describe(e)) from e
        finally:
            b.in_flight -= 1
        if r.status_code >= 500:
            raise BackendFailure(f"HTTP {r.status_code}: {r.text[:300]}")
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except Exception:
                message = r.text[:300]
            raise ClientError(f"the verbalizer backend {b.url} refused the job (HTTP {r.status_code}): {message}")
        b.served += 1
        return r.json()["choices"][0]


def describe(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
