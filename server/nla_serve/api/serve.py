"""``nla-serve serve``: flags (each with an ``NLA_SERVE_*`` environment twin) -> ServerSettings ->
uvicorn. Flags win over the environment; errors name the flag and the value."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from nla_serve.config import FLAT_NAMES, ExplainDefaults, ServerSettings

FLAGS = [
    # flag, settings field, type, help
    ("--model", "model", str, "target model: a Hugging Face folder or hub id (default: embedded SmolLM2-135M-Instruct)"),
    ("--served-model-name", "served_model_name", str, "the model name clients send (default: --model)"),
    ("--nla-av", "nla_av", str, "NLA verbalizer (AV) folder or hub id"),
    ("--nla-ar", "nla_ar", str, "NLA reconstructor (AR) folder or hub id (optional: scores explanations)"),
    ("--engine", "engine", str, "vllm | transformers"),
    ("--capture-method", "capture_method", str, "vLLM capture of layer-K rows: auto | embedded (no draft token) | "
                                                "speculative (vLLM's extract_hidden_states drafter); auto: embedded "
                                                "where the architecture is supported"),
    ("--host", "host", str, "bind address"),
    ("--port", "port", int, "port"),
    ("--api-key", "api_key", str, "require 'Authorization: Bearer KEY' on every route but /health "
                                  "(visible in ps: prefer --api-key-file or the environment)"),
    ("--api-key-file", "api_key_file", str, "read the API key from this file (first line)"),
    ("--api-keys-file", "api_keys_file", str, "several API keys with ids: a YAML file of 'id: key' lines "
                                              "(or 'id: {key: K, permissions: [steer]}'); audit records name the id"),
    ("--steering", "steering", bool, "on | off: the steering request field (default on; with API keys, only "
                                     "keys with the 'steer' permission)"),
    ("--batch", "batch", bool, "on | off: the Batch API (/v1/files, /v1/batches; default on)"),
    ("--batch-db", "batch_db", str, "where files and batches are kept: a SQLite file (default CACHE/batch/batch.db)"),
    ("--batch-concurrency", "batch_concurrency", int, "batch lines run at once while no interactive request "
                                                      "waits (one at a time while any does; default 4)"),
    ("--batch-max-file-bytes", "batch_max_file_bytes", int, "largest batch input file (default 100 MiB)"),
    ("--steering-max-strength", "steering_max_strength", float, "largest |strength| of one steering vector, in "
                                                                "multiples of the activation's norm (default 8)"),
    ("--admin-key", "admin_key", str, "the key of the audit routes (/v1/audit/*), distinct from API keys; "
                                      "without one they are closed (prefer --admin-key-file)"),
    ("--admin-key-file", "admin_key_file", str, "read the admin key from this file (first line)"),
    ("--monitors", "monitors_file", str, "YAML rules applied to every explanation (flag, webhook); see the README"),
    ("--audit", "audit", bool, "on | off: the audit log of every request (default on)"),
    ("--audit-db", "audit_db", str, "audit database: a SQLite file or postgresql://... "
                                    "(default CACHE/audit/audit.db)"),
    ("--audit-key", "audit_key", str, "Ed25519 key signing the log (created at first start; default "
                                      "CACHE/audit/ed25519.key)"),
    ("--audit-redact", "audit_redact", str, "none | prompts: keep only the prompt's SHA-256 in records"),
    ("--audit-retention-days", "audit_retention_days", float, "delete whole records older than this (hourly; "
                                                              "verify still passes)"),
    ("--audit-checkpoint-every", "audit_checkpoint_every", int, "sign a checkpoint at least every N records"),
    ("--audit-checkpoint-seconds", "audit_checkpoint_seconds", float, "... and at least every T seconds"),
    ("--verbalizer-url", "verbalizer_url", str, "explain on stock vLLM servers serving the AV (`vllm serve AV "
                                                "--enable-prompt-embeds`): base URLs, comma-separated; "
                                                "least-loaded routing, failed jobs retried on another"),
    ("--verbalizer-model", "verbalizer_model", str, "the AV's name on those servers (default: their first model)"),
    ("--verbalizer-api-key-file", "verbalizer_api_key_file", str, "the key those servers want (first line)"),
    ("--verbalizer-timeout", "verbalizer_timeout", float, "seconds one explanation may take on one backend "
                                                          "before it is retried on another (default 300)"),
    ("--tensor-parallel-size", "tensor_parallel_size", int, "vLLM's, for the target (capture verified at 1 only)"),
    ("--pipeline-parallel-size", "pipeline_parallel_size", int, "vLLM's, for the target (capture verified at 1 only)"),
    ("--data-parallel-size", "data_parallel_size", int, "vLLM's, for the target (capture verified at 1 only)"),
    ("--distributed-executor-backend", "distributed_executor_backend", str, "vLLM's: mp | ray | uni"),
    ("--device", "device", str, "auto | cpu | cuda (transformers engine and reconstructor)"),
    ("--dtype", "dtype", str, "auto (each checkpoint's own) | float32 | bfloat16 | float16; target and NLA"),
    ("--nla-dtype", "nla_dtype", str, "the NLA's (AV and AR) dtype when it should differ from --dtype"),
    ("--max-model-len", "max_model_len", int, "context length (default: the model's)"),
    ("--target-memory-fraction", "target_memory_fraction", float, "GPU memory share of the target engine"),
    ("--verbalizer-memory-fraction", "verbalizer_memory_fraction", float, "GPU memory share of the verbalizer"),
    ("--kv-cache-gib", "kv_cache_gib", float, "KV cache per engine on CPU, GiB"),
    ("--max-num-seqs", "max_num_seqs", int, "max sequences per engine step"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "token budget per engine step"),
    ("--fve-baseline", "fve_baseline", float, "FVE baseline when the checkpoint has none"),
    ("--max-concurrent-requests", "max_concurrent_requests", int, "beyond this, 429"),
    ("--explain-queue-size", "explain_queue_size", int, "explanation jobs queued before new ones are skipped"),
    ("--explain-concurrency", "explain_concurrency", int, "explanations on the verbalizer at once, each its own "
                                                          "request in the engine's continuous batching"),
    ("--explain-score-batch", "explain_score_batch", int, "most explanations per reconstructor pass"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body (413 beyond)"),
    ("--max-prompt-chars", "max_prompt_chars", int, "most prompt characters per request (default 64 x context)"),
    ("--max-message-chars", "max_message_chars", int, "most characters per chat message (default: the above)"),
    ("--cache-dir", "cache_dir", str, "cache root: the converted default model, merged LoRA NLAs (default ~/.cache/nla-serve)"),
    ("--engine-restarts", "engine_restarts", int, "engine deaths survived per 10 minutes (restart in-process); "
                                                  "beyond: exit non-zero"),
    ("--shutdown-timeout", "shutdown_timeout", float, "seconds after SIGTERM before running requests are ended"),
    ("--tool-call-parser", "tool_call_parser", str, "vLLM's tool-call parser for tool_choice auto (hermes, llama3_json, "
                                                    "mistral, ...; see vLLM's list)"),
    ("--enable-auto-tool-choice", "enable_auto_tool_choice", bool, "on | off: allow tool_choice auto (needs "
                                                                   "--tool-call-parser)"),
    ("--reasoning-parser", "reasoning_parser", str, "vLLM's reasoning parser (deepseek_r1, qwen3, granite, ...): "
                                                    "the model's reasoning returned apart from its answer"),
    ("--chat-template", "chat_template", str, "a Jinja chat template (a file or the template itself) instead of "
                                              "the model's"),
    ("--disable-any-whitespace", "disable_any_whitespace", bool, "on | off: structured outputs write compact JSON"),
    ("--lora-modules", "lora_modules", str, "LoRA adapters of the target, each served under its name: "
                                            "name=folder, separated by spaces or commas (vLLM engine)"),
    ("--enable-lora", "enable_lora", bool, "on | off: vLLM's flag, accepted with --lora-modules (which enables LoRA)"),
    ("--max-loras", "max_loras", int, "LoRA adapters in one batch (default 4)"),
    ("--max-lora-rank", "max_lora_rank", int, "largest LoRA rank served (default 16)"),
    ("--enforce-eager", "enforce_eager", bool, "on | off: vLLM eager mode (default: on for CPU, off for GPU)"),
]
POLICY_FLAGS = [
    ("--explain-default", "enabled", bool, "on | off: explain requests that do not say"),
    ("--explain-positions", "positions", str, "default positions policy: auto | last | all | generated | prompt"),
    ("--explain-max", "max_explanations", int, "default explanations per request"),
    ("--explain-limit", "max_explanations_limit", int, "most explanations a request may ask for"),
    ("--explain-max-tokens", "max_tokens", int, "verbalizer max tokens"),
    ("--explain-deadline", "deadline_s", float, "seconds from a request's arrival after which its pending "
                                              "explanations are answered 'skipped' (default 60)"),
]


def env_name(flag: str) -> str:
    return "NLA_SERVE_" + flag.lstrip("-").replace("-", "_").upper()


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """The server's flags (also taken by ``nla-serve batch run``, which runs the same server in-process)."""
    for flag, _, typ, help_ in FLAGS + POLICY_FLAGS:
        # a bare boolean flag means on, as vLLM's store_true flags (--enable-auto-tool-choice)
        extra = {"nargs": "?", "const": "on"} if typ is bool else {}
        p.add_argument(flag, default=None, help=f"{help_} [env {env_name(flag)}]", **extra)
    p.add_argument("--log-level", default=os.environ.get("NLA_SERVE_LOG_LEVEL", "info"))


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible server",
                       description="Run the OpenAI-compatible server. Every flag also reads NLA_SERVE_<FLAG>.")
    add_server_flags(p)
    p.set_defaults(func=serve)


def settings_from(args: argparse.Namespace) -> ServerSettings:
    def gather(table) -> dict:
        out = {}
        for flag, field, typ, _ in table:
            raw = getattr(args, flag.lstrip("-").replace("-", "_"))
            if raw is None:
                raw = os.environ.get(env_name(flag))
            if raw is None or raw == "":
                continue
            if typ is bool:
                if raw.lower() not in ("on", "off", "true", "false", "1", "0"):
                    raise SystemExit(f"nla-serve: {flag} has value {raw!r}; expected on or off")
                out[field] = raw.lower() in ("on", "true", "1")
                continue
            try:
                out[field] = typ(raw)
            except ValueError:
                raise SystemExit(f"nla-serve: {flag} has value {raw!r}; not a valid {typ.__name__}") from None
        return out

    values = gather(FLAGS)
    if getattr(args, "api_key", None):
        print("nla-serve: warning: --api-key on the command line is visible to every user in `ps`; "
              "use --api-key-file or NLA_SERVE_API_KEY", file=sys.stderr)
    parallel = {k: values.pop(k) for k in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                                           "distributed_executor_backend") if k in values}
    if parallel:
        values["parallel"] = parallel
    if "lora_modules" in values:
        values["lora_modules"] = parse_lora_modules(values["lora_modules"])
    if "verbalizer_url" in values:
        values["verbalizer_url"] = tuple(u for u in values["verbalizer_url"].split(",") if u.strip())
    if "verbalizer_api_key_file" in values:
        values["verbalizer_api_key"] = read_key_file(values.pop("verbalizer_api_key_file"), "--verbalizer-api-key-file")
    for field in ("api_key", "admin_key"):
        key_file = values.pop(field + "_file", None)
        if key_file is not None:
            if field in values:
                raise SystemExit(f"nla-serve: give --{field.replace('_', '-')} or --{field.replace('_', '-')}-file, "
                                 "not both")
            values[field] = read_key_file(key_file, f"--{field.replace('_', '-')}-file")
    monitors_file = values.pop("monitors_file", None)
    if monitors_file is not None:
        from nla_serve.explain.monitors import MonitorConfigError, load_rules

        try:
            values["monitors"] = load_rules(monitors_file)
        except MonitorConfigError as e:
            raise SystemExit(f"nla-serve: {e}") from None
    keys_file = values.pop("api_keys_file", None)
    if keys_file is not None:
        values["api_keys"], values["key_permissions"] = read_keys_table(keys_file)
    table = dict(values.get("api_keys", {})) | ({"default": values["api_key"]} if values.get("api_key") else {})
    if values.get("admin_key") and values["admin_key"] in table.values():
        raise SystemExit("nla-serve: the admin key must differ from every API key")
    try:
        policy = ExplainDefaults(**gather(POLICY_FLAGS))
        settings = ServerSettings.flat(**values, explain=policy)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"]))
        if not where or where in SECTIONS:  # a rule across settings: its message names them
            raise SystemExit(f"nla-serve: {err['msg'].removeprefix('Value error, ')}") from None
        raise SystemExit(f"nla-serve: {flag_of(where)} has value {err.get('input')!r}: {err['msg']}") from None
    try:  # the settings that need vLLM or the disk, checked before any engine loads
        settings.api.chat_template_text()
        from nla_serve.adapters import load_adapters

        t = settings.target
        load_adapters(t.lora_modules, max_rank=t.max_lora_rank, base_name=t.served_name)
        if settings.api.tool_call_parser:
            from nla_serve.api.tool_calls import check_parser_name

            check_parser_name(settings.api.tool_call_parser)
        if settings.api.reasoning_parser:
            from nla_serve.api.reasoning import check_reasoning_parser

            check_reasoning_parser(settings.api.reasoning_parser)
    except ValueError as e:
        raise SystemExit(f"nla-serve: {e}") from None
    return settings


SECTIONS = set(ServerSettings.model_fields)


def parse_lora_modules(raw: str) -> dict[str, str]:
    """``name=folder`` entries separated by spaces or commas (vLLM's form) -> {name: folder}."""
    out: dict[str, str] = {}
    for entry in raw.replace(",", " ").split():
        name, sep, folder = entry.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"nla-serve: --lora-modules entry {entry!r} is not name=folder")
        if name in out:
            raise SystemExit(f"nla-serve: --lora-modules names {name!r} twice")
        out[name] = folder
    return out


def flag_of(where: str) -> str:
    """The flag that sets the setting at ``where`` (``api.port`` -> ``--port``), else the setting."""
    flat = {path: name for name, path in FLAT_NAMES.items()}.get(where, where.rsplit(".", 1)[-1])
    for flag, field, _, _ in FLAGS + POLICY_FLAGS:
        if field == flat:
            return flag
    return f"setting {where}"


def read_key_file(path: str, flag: str) -> str:
    try:
        key = Path(path).expanduser().read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, IndexError, UnicodeDecodeError) as e:
        raise SystemExit(f"nla-serve: {flag} {path!r} could not be read as a key ({type(e).__name__}: {e})") from None
    if not key:
        raise SystemExit(f"nla-serve: {flag} {path!r} holds an empty key")
    return key


PERMISSIONS = ("steer",)


def read_keys_table(path: str) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """``id: key`` per line (which is YAML), or any YAML mapping of ids to keys, where a key may
    instead be ``{key: K, permissions: [steer]}`` -> (id -> key, id -> permissions)."""
    import yaml

    where = f"nla-serve: --api-keys-file {path!r}"
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
        table = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SystemExit(f"{where} could not be read ({type(e).__name__}: {e})") from None
    if not isinstance(table, dict) or not table:
        raise SystemExit(f"{where} must hold 'id: key' lines (a YAML mapping), one per key")
    ids = [line.split(":", 1)[0].strip() for line in text.splitlines() if ":" in line and not line.lstrip().startswith("#")]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise SystemExit(f"{where} names key id {sorted(dup)[0]!r} twice")
    out, permissions = {}, {}
    for key_id, key in table.items():
        granted: tuple[str, ...] = ()
        if isinstance(key, dict):
            unknown = set(key) - {"key", "permissions"}
            granted = key.get("permissions") or ()
            if unknown or not isinstance(granted, list) or not set(granted) <= set(PERMISSIONS):
                raise SystemExit(f"{where}: entry {key_id!r} may hold 'key' and 'permissions' (a list of "
                                 f"{', '.join(PERMISSIONS)}) only")
            key = key.get("key")
        if not isinstance(key_id, str) or not key_id.strip() or not isinstance(key, str) or not key.strip():
            raise SystemExit(f"{where}: entry {key_id!r} needs a non-empty id and a non-empty key (quote keys "
                             "that YAML would read as numbers)")
        out[key_id.strip()] = key.strip()
        if granted:
            permissions[key_id.strip()] = tuple(granted)
    if len(set(out.values())) != len(out):
        raise SystemExit(f"{where} gives the same key to two ids")
    return out, permissions


def serve(args: argparse.Namespace) -> int:
    from nla_serve.api.app import create_app
    from nla_serve.errors import NLAServeError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from(args)
    fatal: list[str] = []

    def give_up(reason: str) -> None:  # an engine could not be kept alive: exit, non-zero
        fatal.append(reason)
        server.should_exit = True

    app = create_app(settings, on_fatal=give_up)
    log = logging.getLogger("nla_serve")
    api = settings.api
    log.info("starting nla-serve on http://%s:%d (engine %s)", api.host, api.port, settings.target.engine)
    # uvicorn's own graceful timeout is the backstop; ours ends requests in-band first
    config = uvicorn.Config(app, host=api.host, port=api.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=int(api.shutdown_timeout) + 10)
    server = DrainingServer(config, app, api.shutdown_timeout)
    try:
        server.run()
    except NLAServeError as e:
        print(f"nla-serve: {e.message}", file=sys.stderr)
        return 2
    if fatal:
        print(f"nla-serve: {fatal[0]}; exiting", file=sys.stderr)
        return 3
    return 0 if server.started else 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a shutdown that gives running requests ``timeout`` seconds and then
    ends them in-band (a 503 ``error`` chunk in a stream, a 503 response otherwise), recorded as
    aborted, instead of waiting for them without a limit."""

    def __init__(self, config: uvicorn.Config, app, timeout: float):
        super().__init__(config)
        self.app = app
        self.timeout = timeout

    async def shutdown(self, sockets=None):
        from nla_serve.errors import UnavailableError

        svc = getattr(self.app.state, "service", None)
        timer = None
        if svc is not None:
            timer = asyncio.get_running_loop().call_later(
                self.timeout, svc.end_all,
                UnavailableError(f"the server is shutting down (its {self.timeout:g} s shutdown timeout passed)"))
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()
