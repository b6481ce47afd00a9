"""The running service: target engine (with capture), NLA runtime (verbalizer engine +
reconstructor), explanation worker and metrics, started and stopped together.

Start order matters on a GPU: the target engine first, then the verbalizer, each with its own
memory fraction (vLLM checks its fraction against free memory at start).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from nla_serve.admission import Admission
from nla_serve.config import ServerSettings
from nla_serve.engines import TargetEngine, make_engine
from nla_serve.errors import CheckpointError
from nla_serve.explain.worker import ExplanationWorker
from nla_serve.metrics import Metrics
from nla_serve.model_folder import dtype_name

log = logging.getLogger("nla_serve")

DEFAULT_NLA_DIR = Path(__file__).resolve().parent / "default_nla"


def resolve_folder(name: str, what: str) -> Path:
    """A local folder, or a hub id downloaded where a network exists; the error says which failed."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(name, None, f"no such folder for {what}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    except Exception as e:
        raise CheckpointError(
            name, None,
            f"is neither a local folder nor a Hugging Face hub id that could be downloaded for {what} "
            f"({type(e).__name__}). This machine may have no network: download the model elsewhere and "
            "pass its folder") from None


class Service:
    def __init__(self, settings: ServerSettings, target: TargetEngine, model_name: str, model_dir: Path,
                 nla=None, nla_reason: str | None = None, worker: ExplanationWorker | None = None,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.target = target
        self.model_name = model_name
        self.model_dir = model_dir
        self.nla = nla
        self.nla_reason = nla_reason  # why explanations are unavailable, when nla is None
        self.worker = worker
        self.metrics = metrics or Metrics(model_name)
        self.admission = Admission(settings.max_concurrent_requests)
        self.started_at = time.time()

    @property
    def tokenizer(self):
        return self.target.tokenizer

    @property
    def layer(self) -> int | None:
        return self.nla.layer if self.nla is not None else None

    @classmethod
    async def start(cls, settings: ServerSettings) -> "Service":
        t0 = time.monotonic()
        if settings.model is None:
            from nla_serve.provision import default_model_dir

            model_dir = default_model_dir(settings.cache_root)
            av, ar = settings.nla_av, settings.nla_ar
            if av is None and (DEFAULT_NLA_DIR / "av").is_dir():
                av, ar = str(DEFAULT_NLA_DIR / "av"), str(DEFAULT_NLA_DIR / "ar")
        else:
            model_dir = resolve_folder(settings.model, "--model")
            av, ar = settings.nla_av, settings.nla_ar
        model_name = settings.served_model_name or (settings.model or "SmolLM2-135M-Instruct")

        ckpt = None
        if av is not None:
            from nla_serve.nla.checkpoint import load_nla
            from nla_serve.nla.checkpoint import read_config

            from nla_serve.nla import lora

            cfg = read_config(model_dir)
            # LoRA NLAs (adapters over the target's own weights) are merged once into a cache folder
            merged = settings.cache_root / "merged"
            av_dir = lora.resolve_folder(resolve_folder(av, "--nla-av"), base=model_dir, cache_dir=merged)
            ar_dir = lora.resolve_folder(resolve_folder(ar, "--nla-ar"), base=model_dir, cache_dir=merged) if ar else None
            ckpt = load_nla(av_dir, ar_dir,
                            target_hidden_size=cfg.get("hidden_size"), target_num_layers=cfg.get("num_hidden_layers"),
                            target_model_type=cfg.get("model_type"), fve_baseline=settings.fve_baseline)
        target = make_engine(settings.target_engine(model_dir, ckpt.layer if ckpt else None))
        await target.start()
        log.info("target %s loaded on the %s engine in %.1fs (%s, hidden %d, %d blocks, context %d)", model_dir,
                 settings.engine, time.monotonic() - t0, dtype_name(target.dtype), target.hidden_size,
                 target.num_layers, target.max_model_len)
        metrics = Metrics(model_name)
        nla = worker = None
        reason = None
        if ckpt is not None:
            from nla_serve.nla.runtime import NLARuntime

            t1 = time.monotonic()
            try:
                nla = await NLARuntime.open(ckpt, settings.verbalizer_engine(ckpt.av.path), settings.reconstructor())
            except BaseException:
                await target.shutdown()
                raise
            worker = ExplanationWorker(nla, queue_size=settings.explain_queue_size,
                                       batch_size=settings.explain_batch_size,
                                       cache_size=settings.explain_cache_size, metrics=metrics)
            await worker.start()
            log.info("NLA loaded in %.1fs: AV %s, AR %s (%s), layer %d, FVE baseline %s (%s)", time.monotonic() - t1,
                     ckpt.av.path, ckpt.ar.path if ckpt.ar else None, nla.dtypes, ckpt.layer, ckpt.fve_baseline,
                     ckpt.baseline_source)
        else:
            reason = "no NLA is configured on this server (start it with --nla-av/--nla-ar)"
            log.warning("%s: responses will mark explanations 'unavailable'", reason)
        return cls(settings, target, model_name, model_dir, nla, reason, worker, metrics)

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        if self.nla is not None:
            await self.nla.close()
        await self.target.shutdown()

    def publish_load(self) -> None:
        adm = self.admission
        self.metrics.set_load(adm.running, adm.waiting, self.worker.depth if self.worker else 0)
        stats = getattr(self.target, "stats", None)  # engines that report on themselves (vLLM)
        if stats is not None:
            self.metrics.record_engine(stats)

    def in_flight(self) -> dict[str, dict[str, int]]:
        """Every per-request structure of the service and its parts, by size (all 0 when idle)."""
        out = {"admission": {"admitted": self.admission.admitted}, "target": self.target.in_flight()}
        if self.worker is not None:
            out["worker"] = self.worker.in_flight()
        if self.nla is not None:
            out["verbalizer"] = self.nla.in_flight()
        return out
