"""The running service: target engine (with capture), NLA runtime (verbalizer engine +
reconstructor), explanation worker and metrics, started and stopped together.

Start order matters on a GPU: the target engine first, then the verbalizer, each with its own
memory fraction (vLLM checks its fraction against free memory at start).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path
from typing import Callable

from nla_serve.adapters import load_adapters
from nla_serve.admission import Admission
from nla_serve.config import ServerSettings
from nla_serve.engines import TargetEngine, make_engine
from nla_serve.errors import CheckpointError, EngineError, NLAServeError, UnavailableError
from nla_serve.explain.worker import ExplanationWorker
from nla_serve.metrics import Metrics
from nla_serve.supervisor import EngineState, EngineSupervisor
from nla_serve.model_folder import dtype_name

log = logging.getLogger("nla_serve")

DEFAULT_NLA_DIR = Path(__file__).resolve().parent / "default_nla"
DEFAULT_CHAT_TEMPLATE = Path(__file__).resolve().parent / "default_chat_template.jinja"


def with_default_model_agents(settings: ServerSettings) -> ServerSettings:
    """The embedded default model (SmolLM2) serves agents out of the box: its own chat template
    extended with tools (identical without them), and tool_choice "auto" read by vLLM's hermes
    parser, unless the operator chose otherwise. Other models keep exactly what the operator says."""
    api = settings.api
    if settings.target.model is not None:
        return settings
    changes: dict = {}
    if api.chat_template is None:
        changes["chat_template"] = str(DEFAULT_CHAT_TEMPLATE)
    if api.tool_call_parser is None:
        changes.update(tool_call_parser="hermes", enable_auto_tool_choice=True)
    return settings.replace(**changes) if changes else settings


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


def open_audit(settings: ServerSettings):
    """The audit log of ``settings``: its store, key (created at first start) and writer."""
    from nla_serve.audit.log import AuditLog
    from nla_serve.audit.note import LogKey, NoteError
    from nla_serve.audit.store import open_store

    try:
        key = LogKey.load_or_create(settings.audit_key_path)
    except NoteError as e:
        raise CheckpointError(str(settings.audit_key_path), None, str(e)) from None
    try:
        store = open_store(settings.audit_location)
    except Exception as e:  # sqlite3 / psycopg errors: say which database and why, then exit
        raise EngineError(f"the audit database {_display(settings.audit_location)} could not be opened "
                          f"({type(e).__name__}: {e}); fix it, move it (--audit-db) or run with --audit off") from None
    a = settings.audit
    audit = AuditLog(store, key, queue_size=a.queue_size, checkpoint_every=a.checkpoint_every,
                     checkpoint_seconds=a.checkpoint_seconds, retention_days=a.retention_days,
                     checkpoint_file=settings.audit_checkpoint_file).open()
    log.info("audit log at %s (verifier key %s)", _display(settings.audit_location), key.verifier)
    return audit


def _display(location: str) -> str:
    """A DSN without its password, for logs."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", location)


class Service:
    def __init__(self, settings: ServerSettings, target: TargetEngine, model_name: str, model_dir: Path,
                 nla=None, nla_reason: str | None = None, worker: ExplanationWorker | None = None,
                 metrics: Metrics | None = None, audit=None):
        self.settings = settings
        self.threads_before: int | None = None  # torch's thread count before start set it to 1
        self.target = target
        self.model_name = model_name
        self.model_dir = model_dir
        self.nla = nla
        self.nla_reason = nla_reason  # why explanations are unavailable, when nla is None
        self._chat_template = settings.api.chat_template_text()
        t = settings.target
        self.adapters = load_adapters(t.lora_modules, max_rank=t.max_lora_rank, base_name=model_name)
        self.worker = worker
        self.metrics = metrics or Metrics(model_name)
        self.admission = Admission(settings.api.max_concurrent_requests)
        self.started_at = time.time()
        self.fingerprints: dict[str, str] = {}  # role -> SHA-256 of its folder, filled in the background
        self._fingerprinting: asyncio.Task | None = None
        # engine -> "up" | "restarting" | "failed", with why (see supervisor.py)
        self.states: dict[str, EngineState] = {"target": "up"} | ({"verbalizer": "up"} if nla is not None else {})
        self.state_reasons: dict[str, str | None] = {}
        self.supervisors: list[EngineSupervisor] = []
        self.on_fatal: Callable[[str], None] | None = None  # the CLI exits non-zero; tests just look
        self.fatal: str | None = None
        self._enders: dict[str, Callable[[NLAServeError], None]] = {}  # request id -> ends it in-band
        self.audit = audit  # the AuditLog (audit/log.py) when --audit is on
        if audit is not None:
            audit.metrics = self.metrics
        from nla_serve.explain.monitors import Monitoring
        from nla_serve.explain.webhooks import WebhookSender

        hooks = WebhookSender(metrics=self.metrics) if any(r.action == "webhook" for r in settings.monitors) else None
        self.monitoring = Monitoring(settings.monitors, metrics=self.metrics, webhooks=hooks)
        self.meta_hashes: dict[str, str] = {}  # "av_meta" / "ar_meta" -> SHA-256 of that nla_meta.yaml

    # -- engine health ---------------------------------------------------------------------------

    def supervise(self) -> None:
        """Watch both engines; a dead one is restarted in-process (supervisor.py)."""
        def replace_target(engine) -> None:
            self.target = engine

        kw = dict(on_change=self._engine_changed, max_restarts=self.settings.target.restarts)
        self.supervisors = [EngineSupervisor("target", lambda: self.target, replace_target, **kw)]
        if self.nla is not None:
            self.supervisors.append(EngineSupervisor("verbalizer", lambda: self.nla.engine,
                                                     self.nla.replace_engine, **kw))
        for sup in self.supervisors:
            sup.start()

    def _engine_changed(self, name: str, state: EngineState, reason: str | None) -> None:
        self.states[name] = state
        self.state_reasons[name] = reason
        if name == "target" and state != "up":
            self.end_all(UnavailableError(reason or "the target engine is down"))
        if name == "verbalizer" and self.worker is not None:
            self.worker.unavailable_reason = None if state == "up" else reason
        if state == "failed":
            self.fatal = reason
            log.critical("%s: giving up", reason)
            if self.on_fatal is not None:
                self.on_fatal(reason or "an engine failed")

    def check_target(self) -> None:
        """Refuse new generations (503) while the target engine is down."""
        if self.states["target"] != "up":
            raise UnavailableError(self.state_reasons.get("target") or "the target engine is down; retry shortly")

    def track(self, request_id: str, end: Callable[[NLAServeError], None]) -> None:
        self._enders[request_id] = end

    def untrack(self, request_id: str) -> None:
        self._enders.pop(request_id, None)

    def end_all(self, error: NLAServeError) -> None:
        """End every request in flight with ``error`` (in-band in streams): the engine died, or the
        shutdown timeout passed."""
        for end in list(self._enders.values()):
            end(error)

    def start_fingerprints(self) -> None:
        """Hash the target, AV and AR folders off the event loop (minutes for a large model, the
        first time; remembered in the cache root after that)."""
        from nla_serve.model_folder import folder_sha256

        folders = {"target": self.model_dir}
        if self.nla is not None:
            folders["av"] = self.nla.ckpt.av.path
            if self.nla.ckpt.ar is not None:
                folders["ar"] = self.nla.ckpt.ar.path
        cache = self.settings.cache_root / "fingerprints.json"

        async def hash_all() -> None:
            for role, folder in folders.items():
                try:
                    self.fingerprints[role] = await asyncio.to_thread(folder_sha256, folder, cache)
                except OSError as e:
                    log.warning("could not hash the %s folder %s: %s", role, folder, e)

        self._fingerprinting = asyncio.create_task(hash_all(), name="nla-fingerprints")

    async def fingerprinted(self) -> None:
        """Wait until the folders are hashed (benchmarks: hashing a new folder takes both CPU
        cores for seconds, which would land on whatever is measured first)."""
        if self._fingerprinting is not None:
            await asyncio.shield(self._fingerprinting)

    @property
    def tokenizer(self):
        return self.target.tokenizer

    @property
    def chat_template(self) -> str | None:
        """The operator's --chat-template text (None: the model's own), read once at start."""
        return self._chat_template

    @property
    def layer(self) -> int | None:
        return self.nla.layer if self.nla is not None else None

    @classmethod
    async def start(cls, settings: ServerSettings) -> "Service":
        t0 = time.monotonic()
        # The audit log first: a damaged log or a wrong key is an operator error found in a second,
        # not after minutes of loading engines.
        audit = await asyncio.to_thread(open_audit, settings) if settings.audit.enabled else None
        try:
            return await cls._start(settings, t0, audit)
        except BaseException:
            if audit is not None:
                await asyncio.to_thread(audit.close)
            raise

    @classmethod
    async def _start(cls, settings: ServerSettings, t0: float, audit) -> "Service":
        from nla_serve.api.tool_calls import check_parser_name

        settings = with_default_model_agents(settings)
        target_cfg = settings.target
        # the operator's agent settings fail in a second, before minutes of loading engines
        settings.api.chat_template_text()
        if settings.api.tool_call_parser:
            check_parser_name(settings.api.tool_call_parser)
        av, ar = settings.nla.av, settings.nla.ar
        if target_cfg.model is None:
            from nla_serve.provision import default_model_dir

            model_dir = default_model_dir(settings.cache_root)
            if av is None and (DEFAULT_NLA_DIR / "av").is_dir():
                av, ar = str(DEFAULT_NLA_DIR / "av"), str(DEFAULT_NLA_DIR / "ar")
        else:
            model_dir = resolve_folder(target_cfg.model, "--model")
        model_name = target_cfg.served_name

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
                            target_model_type=cfg.get("model_type"), fve_baseline=settings.nla.fve_baseline)
        target_settings = settings.target_engine(model_dir, ckpt.layer if ckpt else None)
        target = make_engine(target_settings)
        await target.start()
        threads_before = None
        if target_settings.cpu_cores is not None and getattr(target, "on_cpu", False):
            # The engines' models have cores of their own (engine_config.split_cores); this process's
            # torch work (the reconstructor, steering rows) would spread OpenMP threads over them and
            # spin against them: one thread measured +11% explanations/s under load (docs/benchmarks.md).
            # Restored at stop (tests run several services in one process).
            import torch

            threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        log.info("target %s loaded on the %s engine in %.1fs (%s, hidden %d, %d blocks, context %d)", model_dir,
                 target_cfg.engine, time.monotonic() - t0, dtype_name(target.dtype), target.hidden_size,
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
            w = settings.worker
            worker = ExplanationWorker(nla, queue_size=w.queue_size, concurrency=w.concurrency,
                                       score_batch=w.score_batch, cache_size=w.cache_size, metrics=metrics)
            await worker.start()
            log.info("NLA loaded in %.1fs: AV %s, AR %s (%s), layer %d, FVE baseline %s (%s)", time.monotonic() - t1,
                     ckpt.av.path, ckpt.ar.path if ckpt.ar else None, nla.dtypes, ckpt.layer, ckpt.fve_baseline,
                     ckpt.baseline_source)
        else:
            reason = "no NLA is configured on this server (start it with --nla-av/--nla-ar)"
            log.warning("%s: responses will mark explanations 'unavailable'", reason)
        service = cls(settings, target, model_name, model_dir, nla, reason, worker, metrics, audit)
        service.threads_before = threads_before  # restored at stop
        if ckpt is not None:
            for role, part in (("av_meta", ckpt.av), ("ar_meta", ckpt.ar)):
                if part is not None and (part.path / "nla_meta.yaml").is_file():
                    service.meta_hashes[role] = hashlib.sha256((part.path / "nla_meta.yaml").read_bytes()).hexdigest()
        service.start_fingerprints()
        service.supervise()
        return service

    def producer(self) -> dict:
        """What produced an answer, for its audit record: content hashes (null while still being
        computed at start), layer, engine, dtypes and server version."""
        from nla_serve import __version__

        fp = self.fingerprints
        return {"server_version": __version__, "engine": self.settings.target.engine, "model": self.model_name,
                "target_sha256": fp.get("target"), "av_sha256": fp.get("av"), "ar_sha256": fp.get("ar"),
                "av_meta_sha256": self.meta_hashes.get("av_meta"), "ar_meta_sha256": self.meta_hashes.get("ar_meta"),
                "layer": self.layer, "dtype": dtype_name(self.target.dtype),
                "nla_dtype": self.nla.dtypes if self.nla is not None else None}

    async def stop(self) -> None:
        if self.audit is not None:  # after the last request: its record is the last one written
            await asyncio.to_thread(self.audit.close)
        if self._fingerprinting is not None:
            self._fingerprinting.cancel()
        for sup in self.supervisors:
            await sup.stop()
        if self.worker is not None:
            await self.worker.stop()
        if self.nla is not None:
            await self.nla.close()
        if self.monitoring.webhooks is not None:
            await self.monitoring.webhooks.stop()
        await self.target.shutdown()
        if self.threads_before:
            import torch

            torch.set_num_threads(self.threads_before)

    def publish_load(self) -> None:
        adm = self.admission
        self.metrics.set_load(adm.running, adm.waiting, self.worker.depth if self.worker else 0)
        stats = getattr(self.target, "stats", None)  # engines that report on themselves (vLLM)
        if stats is not None:
            self.metrics.record_engine(stats)
        fleet = self.verbalizer_backends()
        if fleet is not None:
            self.metrics.set_backends(fleet)

    def verbalizer_backends(self) -> list[dict] | None:
        """Each --verbalizer-url backend's state; None with an in-process verbalizer."""
        state = getattr(self.nla.engine, "fleet_state", None) if self.nla is not None else None
        return state() if state is not None else None

    def in_flight(self) -> dict[str, dict[str, int]]:
        """Every per-request structure of the service and its parts, by size (all 0 when idle)."""
        out = {"admission": {"admitted": self.admission.admitted, "tracked": len(self._enders)},
               "target": self.target.in_flight()}
        if self.worker is not None:
            out["worker"] = self.worker.in_flight()
        if self.nla is not None:
            out["verbalizer"] = self.nla.in_flight()
        return out
