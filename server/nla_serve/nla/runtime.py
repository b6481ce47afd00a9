"""The library entry point: explain vectors and score the explanations.

    rt = await NLARuntime.open(load_nla("nla/av", "nla/ar"), EngineSettings(model="nla/av", kind="vllm"))
    [e] = await rt.explain_vectors(torch.randn(1, rt.d_model))
    e.status, e.text, e.fve

The runtime owns the verbalizer engine (an engine of the AV with prompt embeddings on) and the
reconstructor; the server and the trainer both go through it. Each result says whether it can be
trusted (``status``) and why not (``reason``); nothing is made up when the AV fails.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from nla_serve.config import MAX_EXPLANATION_TOKENS, EngineSettings, ReconstructorSettings
from nla_serve.errors import ClientError
from nla_serve.nla.checkpoint import NLACheckpoint, read_config
from nla_serve.model_folder import dtype_name
from nla_serve.nla.reconstructor import Reconstructor
from nla_serve.nla.support import score_explanations
from nla_serve.nla.verbalizer import Verbalization, Verbalizer
from nla_serve.types import Explanation

if TYPE_CHECKING:
    import torch

    from nla_serve.engines import TargetEngine


def check_vectors(vectors: "torch.Tensor", d_model: int) -> "torch.Tensor":
    import torch

    v = torch.as_tensor(vectors)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[1] != d_model:
        raise ClientError(f"vectors must be a list of {d_model}-wide float lists; got shape {list(v.shape)}",
                          param="vectors")
    v = v.to(torch.float32)
    if not torch.isfinite(v).all():
        raise ClientError("vectors contain NaN or infinite values (or values beyond float32)", param="vectors")
    # The injection divides by the norm; a norm that overflows float32 would turn the vector into
    # zeros and the explanation would describe nothing. [N]
    bad = (~torch.isfinite(torch.linalg.vector_norm(v, dim=-1))).nonzero().flatten().tolist()
    if bad:
        raise ClientError(f"vector {bad[0]} has a norm beyond float32's range; scale it down (only its "
                          "direction is explained)", param="vectors")
    return v


def to_explanation(vb: Verbalization) -> Explanation:
    if vb.broken:
        return Explanation(status="failed", reason=vb.broken, tokens=vb.tokens, raw=vb.raw)
    if not vb.closed:
        return Explanation(status="truncated", text=vb.body, truncated=True, tokens=vb.tokens, raw=vb.raw,
                           reason=f"the verbalizer stopped ({vb.finish_reason}) before closing </explanation>; "
                                  "the text is partial")
    return Explanation(status="ok", text=vb.body, tokens=vb.tokens, raw=vb.raw)


class NLARuntime:
    def __init__(self, checkpoint: NLACheckpoint, engine: "TargetEngine", reconstructor: Reconstructor | None):
        self.ckpt = checkpoint
        self.engine = engine
        self.verbalizer = Verbalizer(checkpoint.av, engine)
        self.reconstructor = reconstructor

    @property
    def d_model(self) -> int:
        return self.ckpt.d_model

    @property
    def dtypes(self) -> dict[str, str | None]:
        """What the AV and AR really run in (``/v1/models`` reports it)."""
        return {"av": dtype_name(self.engine.dtype),
                "ar": dtype_name(self.reconstructor.dtype) if self.reconstructor is not None else None}

    def in_flight(self) -> dict[str, int]:
        return self.engine.in_flight()

    @property
    def layer(self) -> int:
        return self.ckpt.layer

    @property
    def max_explanation_tokens(self) -> int:
        """The longest explanation the verbalizer engine has room for."""
        return min(MAX_EXPLANATION_TOKENS, self.engine.max_model_len - len(self.ckpt.av.prompt_ids))

    @classmethod
    async def open(cls, checkpoint: NLACheckpoint, engine: EngineSettings,
                   reconstructor: ReconstructorSettings | None = None) -> "NLARuntime":
        """Start the verbalizer engine (``engine``: kind, device, dtype, memory; built by
        ``ServerSettings.verbalizer_engine`` in the server) and load the AR, if the pair has one.
        The engine's context is sized here: the AV prompt plus the longest explanation allowed,
        within the AV's own position limit."""
        from nla_serve.engines import make_engine

        ckpt = checkpoint
        limit = read_config(ckpt.av.path).get("max_position_embeddings")
        ctx = len(ckpt.av.prompt_ids) + MAX_EXPLANATION_TOKENS
        settings = engine.model_copy(update=dict(
            model=str(ckpt.av.path), enable_prompt_embeds=True, warm_logprobs=False,
            max_model_len=min(ctx, limit) if isinstance(limit, int) else ctx))
        eng = make_engine(settings)
        await eng.start()
        rec = None
        if ckpt.ar is not None:
            r = reconstructor or ReconstructorSettings()
            rec = Reconstructor(ckpt.ar, device=r.device, dtype=r.dtype)
            try:
                await asyncio.to_thread(rec.load)
            except BaseException:
                await eng.shutdown()
                raise
        return cls(ckpt, eng, rec)

    async def explain_vectors(self, vectors: "torch.Tensor", *, temperature: float = 0.0, max_tokens: int = 200,
                              reconstruct: bool = True, seed: int | None = None,
                              request_id: str | None = None) -> list[Explanation]:
        """vectors: [N, d] -> N explanations, in order, scored by the AR when ``reconstruct``."""
        v = check_vectors(vectors, self.d_model)
        results = await self.verbalize(v, temperature=temperature, max_tokens=max_tokens, seed=seed,
                                       request_id=request_id)
        await self.score(results, v, reconstruct)
        return results

    async def verbalize(self, vectors: "torch.Tensor", *, temperature: float = 0.0, max_tokens: int = 200,
                        seed: int | None = None, request_id: str | None = None) -> list[Explanation]:
        """vectors: [N, d] -> N explanations, not yet scored (``score`` does that; the worker scores
        whatever finished together in one reconstructor pass)."""
        v = check_vectors(vectors, self.d_model)
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ClientError(f"temperature must be >= 0, got {temperature}", param="temperature")
        if not 1 <= max_tokens <= self.max_explanation_tokens:
            raise ClientError(f"max_tokens must be from 1 to {self.max_explanation_tokens} (the verbalizer's "
                              f"room), got {max_tokens}", param="max_tokens")
        verbs = await self.verbalizer.verbalize(v, temperature=temperature, max_tokens=max_tokens, seed=seed,
                                                request_id=request_id)
        return [to_explanation(vb) for vb in verbs]

    async def score(self, results: list[Explanation], vectors: "torch.Tensor", reconstruct: bool = True,
                    claims: list[bool] | None = None, hypotheses: "list[tuple[str, ...]] | None" = None) -> None:
        """Fill mse/cos/fve in place for every result that has text; ``claims`` (their support and
        verdict, nla/support.py) where ``claims`` asks, and ``extra["hypotheses"]`` where
        ``hypotheses`` gives some (user-written claims, each with the FVE it adds), all in the same
        reconstructor pass."""
        vectors = check_vectors(vectors, self.d_model)
        todo = [i for i, r in enumerate(results) if r.text is not None]
        if not todo:
            return
        if not reconstruct or self.reconstructor is None:
            why = "reconstruction not requested" if not reconstruct else "no AR (reconstructor) is loaded"
            for i in todo:
                results[i].fve_reason = why
            return
        ck = self.ckpt
        scored = await asyncio.to_thread(
            score_explanations, self.reconstructor, [results[i].text for i in todo], vectors[todo], ck.fve_baseline,
            claims=[bool(claims and claims[i]) for i in todo],
            hypotheses=[tuple(hypotheses[i]) if hypotheses else () for i in todo],
            claim_thresholds=ck.claim_thresholds, hypothesis_thresholds=ck.hypothesis_thresholds)
        for n, i in enumerate(todo):
            r, s = results[i], scored.scores[n]
            r.mse, r.cos, r.fve, r.claims = s.mse, s.cos, s.fve, scored.claims[n]
            if scored.hypotheses[n] is not None:
                r.extra["hypotheses"] = scored.hypotheses[n]
            if s.fve is None:
                r.fve_reason = ck.baseline_source

    async def reconstruct(self, texts: list[str]) -> "torch.Tensor":
        """Text -> vector: the AR's prediction for each explanation text, [N, d] float32 on the CPU,
        at the AR's own scale (scoring normalises both sides to norm sqrt(d) before comparing).
        The public entry for whatever turns words into activations (steering from text, edited
        explanations); it runs off the event loop."""
        if self.reconstructor is None:
            raise ClientError("this NLA has no reconstructor (AR), so text cannot be turned into a vector; "
                              "start the server with --nla-ar")
        texts = list(texts)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ClientError("give at least one text, none of them empty")
        return await asyncio.to_thread(self.reconstructor.reconstruct, texts)

    def replace_engine(self, engine: "TargetEngine") -> None:
        """Swap in a restarted verbalizer engine (same settings; see supervisor.py)."""
        self.engine = engine
        self.verbalizer.engine = engine

    async def close(self) -> None:
        await self.engine.shutdown()
