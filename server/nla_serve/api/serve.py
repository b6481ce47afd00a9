"""``nla-serve serve``: flags (each with an ``NLA_SERVE_*`` environment twin) -> ServerSettings ->
uvicorn. Flags win over the environment; errors name the flag and the value."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

from nla_serve.config import ExplainDefaults, ServerSettings

FLAGS = [
    # flag, settings field, type, help
    ("--model", "model", str, "target model: a Hugging Face folder or hub id (default: embedded SmolLM2-135M-Instruct)"),
    ("--served-model-name", "served_model_name", str, "the model name clients send (default: --model)"),
    ("--nla-av", "nla_av", str, "NLA verbalizer (AV) folder or hub id"),
    ("--nla-ar", "nla_ar", str, "NLA reconstructor (AR) folder or hub id (optional: scores explanations)"),
    ("--engine", "engine", str, "vllm | transformers"),
    ("--host", "host", str, "bind address"),
    ("--port", "port", int, "port"),
    ("--api-key", "api_key", str, "require 'Authorization: Bearer KEY' on every route but /health"),
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
    ("--explain-batch-size", "explain_batch_size", int, "explanations per verbalizer batch"),
    ("--cache-dir", "cache_dir", str, "cache root: the converted default model, merged LoRA NLAs (default ~/.cache/nla-serve)"),
    ("--enforce-eager", "enforce_eager", bool, "on | off: vLLM eager mode (default: on for CPU, off for GPU)"),
]
POLICY_FLAGS = [
    ("--explain-default", "enabled", bool, "on | off: explain requests that do not say"),
    ("--explain-positions", "positions", str, "default positions policy: auto | last | all | generated | prompt"),
    ("--explain-max", "max_explanations", int, "default explanations per request"),
    ("--explain-limit", "max_explanations_limit", int, "most explanations a request may ask for"),
    ("--explain-max-tokens", "max_tokens", int, "verbalizer max tokens"),
]


def env_name(flag: str) -> str:
    return "NLA_SERVE_" + flag.lstrip("-").replace("-", "_").upper()


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible server",
                       description="Run the OpenAI-compatible server. Every flag also reads NLA_SERVE_<FLAG>.")
    for flag, _, _, help_ in FLAGS + POLICY_FLAGS:
        p.add_argument(flag, default=None, help=f"{help_} [env {env_name(flag)}]")
    p.add_argument("--log-level", default=os.environ.get("NLA_SERVE_LOG_LEVEL", "info"))
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

    try:
        policy = ExplainDefaults(**gather(POLICY_FLAGS))
        return ServerSettings(**gather(FLAGS), explain=policy)
    except ValidationError as e:
        err = e.errors()[0]
        raise SystemExit(f"nla-serve: setting {'.'.join(map(str, err['loc']))} has value {err.get('input')!r}: "
                         f"{err['msg']}") from None


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from nla_serve.api.app import create_app
    from nla_serve.errors import NLAServeError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from(args)
    app = create_app(settings)
    log = logging.getLogger("nla_serve")
    log.info("starting nla-serve on http://%s:%d (engine %s)", settings.host, settings.port, settings.engine)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level.lower())
    server = uvicorn.Server(config)
    try:
        server.run()
    except NLAServeError as e:
        print(f"nla-serve: {e.message}", file=sys.stderr)
        return 2
    return 0 if server.started else 1
