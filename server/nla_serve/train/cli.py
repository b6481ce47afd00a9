"""``nla-serve train | eval | calibrate``: flags -> TrainConfig / arguments -> run. Nothing else.

``register(subparsers)`` adds the three subcommands to the parser of ``nla_serve.cli``; each sets
``func(args) -> int``. The ``train`` flags mirror ``TrainConfig`` field for field
(``--ar-steps`` is ``ar_steps``), so a new setting needs one field and one help line.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from nla_serve.train.config import STAGES, TrainConfig

HELP = {
    "seed": "seed of every random choice (sampling, data order, initialisation)",
    "device": "auto (a GPU when present), cpu, cuda, cuda:N",
    "threads": "torch CPU threads (default: one per core)",
    "dtype": "training compute dtype: float32, or bfloat16 (autocast; weights stay fp32)",
    "docs_per_source": "at most this many documents per text source, spread over the source",
    "chat_max_tokens": "longest reply of a target-written chat transcript",
    "chat_batch": "transcripts generated per batch",
    "genre_max_tokens": "longest answer the target writes for one genre-grid cell",
    "writer_engine": "what writes the chats and the genre grid: auto (vLLM when installed), vllm, transformers",
    "context_tokens": "tokens of each document the target reads",
    "positions_per_doc": "activations sampled per document",
    "min_position": "never sample the first N positions (nor special tokens, nor huge-norm rows)",
    "heldout_fraction": "share of documents held out (by a hash of source and id) for eval and calibration",
    "targets_url": "an OpenAI-compatible server (vLLM, this one, any) whose model writes the warm-start targets; "
                   "key from NLA_SERVE_TARGETS_API_KEY or OPENAI_API_KEY",
    "targets_model": "the model name to ask at --targets-url",
    "targets_concurrency": "requests to --targets-url at once",
    "targets_max_tokens": "the longest target --targets-url may write, in its tokens",
    "quote_words": "words of the local phrase a built target quotes (0, the default: none; an AV trained with 3 found "
                   "only one such quote in five on unseen text)",
    "previous_token": "whether a built target also names the token before the final one (off, the default: the "
                      "pair trained with it, 2026-12-08, wrote it wrong too often; docs/training.md)",
    "next_token": "what a built target says of the model's next token: kind (the kind of token and how sure: the "
                  "pair of 2026-12-07), kind-except-new-word (the default: the same, but nothing when a new word "
                  "is the likeliest), "
                  "quoted (--quote-predictions candidates: 1 the pair of the morning of 2026-12-07, 3 the one of "
                  "2026-12-06) or none",
    "quote_predictions": "how many next-token candidates a target quotes with --next-token quoted",
    "av_template": "AV prompt template ({injection_char} marks the injected vector)",
    "ar_template": "AR prompt template ({explanation} is the explanation body)",
    "marker": "injection character (default: the first candidate that is one token for the target)",
    "injection_scale": "norm of the injected row (default: median layer-K norm of the training rows)",
    "lora_rank": "LoRA rank over the target's weights; 0 trains and ships full weights",
    "lora_alpha": "LoRA alpha (scaling = alpha / rank)",
    "adapter_dtype": "storage dtype of exported adapters: bfloat16 or float32",
    "ar_steps": "supervised AR steps", "ar_batch": "AR batch size", "ar_lr": "AR learning rate",
    "av_steps": "supervised AV steps", "av_batch": "AV batch size", "av_lr": "AV learning rate",
    "rl_steps": "GRPO steps (0 skips RL)", "rl_batch": "vectors per GRPO step", "rl_group": "samples per vector",
    "rl_lr": "AV learning rate in RL", "rl_ar_lr": "AR learning rate in RL",
    "rl_temperature": "sampling temperature in RL", "rl_max_new_tokens": "longest sampled explanation in RL",
    "rl_truncation_penalty": "reward penalty for an explanation that never closes its tag",
    "refit_rows": "training rows the final AV explains for the AR refit (0 skips it)",
    "refit_steps": "AR refit steps on the AV's own explanations", "refit_lr": "AR learning rate in the refit",
    "refit_gen_batch": "explanations written per batch in the refit",
    "refit_max_tokens": "AV token limit for the refit's explanations",
    "save_every": "save resumable state every N steps",
    "eval_n": "held-out activations evaluated after training", "eval_max_tokens": "AV token limit in eval",
    "calibrate_n": "held-out activations used for the FVE baseline",
}
HELDOUT_FRACTION = TrainConfig.heldout_fraction  # the trainer's default split
POSITIONAL = {"target", "layer", "work", "out", "stages", "sources", "progress"}


def _flag(text: str) -> bool:
    """A yes/no option's value: argparse's ``type=bool`` would read "false" as True."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _type(default):
    if isinstance(default, bool):
        return _flag
    return type(default) if default is not None else None


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train an NLA (AV + AR) for a target model on this machine",
                       description="Train an NLA for TARGET at layer K; resumable stages, see docs/training.md.")
    p.add_argument("--target", required=True, help="target model folder (Hugging Face layout)")
    p.add_argument("--layer", type=int, required=True, help="layer K: output of decoder block K (hidden_states[K+1])")
    p.add_argument("--work", required=True, type=Path, help="work dir holding every stage's outputs (resumable)")
    p.add_argument("--out", type=Path, help="where OUT/av, OUT/ar and OUT/eval.json go (default WORK/nla)")
    p.add_argument("--source", action="append", dest="sources",
                   help="text source, repeatable: kjv, pydoc, chat[:N], genres[:N], text:PATH "
                        "(default kjv, pydoc, chat:200, genres:1000)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the loss log is still written)")
    floats = {"injection_scale"}
    for f in fields(TrainConfig):
        if f.name in POSITIONAL:
            continue
        kind = float if f.name in floats else (_type(f.default) or str)
        if f.name in ("docs_per_source", "threads"):
            kind = int
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                       help=HELP.get(f.name, "") + f" (default {f.default})")
    p.set_defaults(func=run_train)


def config_from_args(args) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
              if f.name not in POSITIONAL and hasattr(args, f.name)}
    extra = {"sources": tuple(args.sources)} if args.sources else {}
    return TrainConfig(target=args.target, layer=args.layer, work=args.work, out=args.out,
                       stages=tuple(s for s in args.stages.split(",") if s), progress=not args.no_progress,
                       **values, **extra)


def run_train(args) -> int:
    from nla_serve.train.pipeline import run_training

    result = run_training(config_from_args(args))
    print(json.dumps(result, indent=2, default=str))
    return 0


def _activations(args, layer: int):
    """Held-out activations: from a training work dir, or collected now from text sources."""
    from nla_serve.train.activations import collect, load_activations
    from nla_serve.train.corpus import is_heldout, text_sources_documents
    from nla_serve.model_folder import resolve_device

    if args.work:
        return load_activations(Path(args.work) / "activations").split(getattr(args, "split", "heldout"))
    if not args.target:
        sys.exit("give --work (a training work dir) or --target with --source (text to measure on)")
    cache = Path(args.activations_dir or Path(args.out_json or ".").resolve().parent / ".nla-activations")
    # Only held-out documents are used, so only they are read (a tenth of the work); the split is by a
    # hash of each document, the trainer's own rule at its default fraction, so none was trained on.
    docs = (d for d in text_sources_documents(args.sources or ["kjv", "pydoc"], args.docs_per_source)
            if is_heldout(d.source, d.id, HELDOUT_FRACTION))
    return collect(args.target, docs, layer, cache, device=resolve_device(args.device),
                   heldout_fraction=HELDOUT_FRACTION, progress=not args.no_progress).split("heldout")


def add_common(p) -> None:
    p.add_argument("--av", required=True, type=Path, help="AV folder (full weights or LoRA)")
    p.add_argument("--ar", required=True, type=Path, help="AR folder (full weights or LoRA)")
    p.add_argument("--work", type=Path, help="training work dir: use its held-out activations")
    p.add_argument("--target", help="target model folder: collect held-out activations now (and LoRA base)")
    p.add_argument("--source", action="append", dest="sources", help="text source for --target (kjv, pydoc, text:PATH)")
    p.add_argument("--docs-per-source", type=int, default=200, help="documents per source for --target (default 200)")
    p.add_argument("--activations-dir", type=Path, help="where activations collected for --target are kept")
    p.add_argument("--cache-dir", type=Path, help="where LoRA folders are merged (default ~/.cache/nla-serve/merged)")
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda")
    p.add_argument("--no-progress", action="store_true")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="FVE of AR(AV(v)) on held-out activations, with the shuffled control -> JSON")
    add_common(p)
    p.add_argument("--n", type=int, default=200, help="held-out activations to evaluate (default 200)")
    p.add_argument("--engine", choices=["batch", "transformers", "vllm"], default="batch",
                   help="batch: batched plain transformers (default); transformers/vllm: the server's runtime")
    p.add_argument("--max-tokens", type=int, default=200, help="AV token limit (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled control")
    p.add_argument("--split", choices=["heldout", "unseen"], default="heldout",
                   help="with --work: documents held out of trained genres (heldout), or the genres and topics "
                        "never trained on (unseen)")
    p.add_argument("--out", dest="out_json", type=Path, help="write the JSON here (default: print it)")
    p.set_defaults(func=run_eval)


def _layer(av: Path) -> int:
    from nla_serve.nla.checkpoint import load_av
    from nla_serve.nla.lora import is_lora_folder

    if is_lora_folder(av):
        import yaml

        return int(yaml.safe_load((av / "nla_meta.yaml").read_text())["extraction_layer_index"])
    return load_av(av).layer


def run_eval(args) -> int:
    from nla_serve.train.evaluate import evaluate, write_report
    from nla_serve.model_folder import resolve_device

    acts = _activations(args, _layer(args.av))
    report = evaluate(args.av, args.ar, acts, n=args.n, engine=args.engine, device=resolve_device(args.device),
                      max_tokens=args.max_tokens, seed=args.seed, base=args.target, cache_dir=args.cache_dir)
    if args.out_json:
        write_report(report, args.out_json)
    summary = {k: report[k] for k in ("n", "baseline", "fve", "cos", "mse", "shuffled", "truncated_share", "mean_tokens")}
    print(json.dumps(summary if args.out_json else report, indent=2, ensure_ascii=False))
    return 0


def add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="measure the FVE baseline and the claim-support thresholds on held-out "
                                         "activations and store them in the sidecars")
    add_common(p)
    p.add_argument("--n", type=int, default=4000, help="held-out activations for the FVE baseline (default 4000)")
    p.add_argument("--only", choices=["baseline", "thresholds"],
                   help="calibrate only this (thresholds: keep the sidecar's baseline, measured on other activations)")
    p.add_argument("--claims-n", type=int, default=300,
                   help="held-out activations the pair explains for the support thresholds, drawn evenly across "
                        "sources (default 300; 0 skips the thresholds)")
    p.add_argument("--claims-quantile", type=float, default=0.95,
                   help="supported at this quantile of the foreign claims' support, contradicted at 1 minus it "
                        "(default 0.95)")
    p.add_argument("--max-tokens", type=int, default=200, help="AV token limit for those explanations (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the activations drawn and of the foreign pairing")
    p.set_defaults(func=run_calibrate, out_json=None)


def run_calibrate(args) -> int:
    from nla_serve.train.calibrate import calibrate, fve_baseline
    from nla_serve.train.calibrate_claims import calibrate_thresholds
    from nla_serve.train.evaluate import stratified
    from nla_serve.model_folder import resolve_device

    acts = _activations(args, _layer(args.av))
    where = f"work dir {args.work}" if args.work else f"text {','.join(args.sources or ['kjv', 'pydoc'])}"
    out: dict = {}
    vecs = acts.vectors[: args.n]
    if len(vecs) < 2:
        sys.exit(f"need at least 2 held-out activations, got {len(vecs)}")
    # The baseline is written after the thresholds: a LoRA pair is merged under a key that hashes its
    # sidecar, so writing it first would cost one more merge of the whole model.
    baseline = fve_baseline(vecs) if args.only != "thresholds" else None
    if args.only != "baseline" and args.claims_n > 0:
        rows = stratified(acts.records, args.claims_n, args.seed)
        blocks = calibrate_thresholds(
            args.av, args.ar, acts.vectors[rows], baseline=baseline, quantile_q=args.claims_quantile,
            max_tokens=args.max_tokens, seed=args.seed, device=resolve_device(args.device), base=args.target,
            cache_dir=args.cache_dir, measured_on=f"{len(rows)} held-out activations of {where} (seed {args.seed})")
        out |= {name: {k: b[k] for k in ("supported", "contradicted", "null_quantiles", "n", "by_place") if k in b}
                for name, b in blocks.items()}
    if baseline is not None:
        baseline = calibrate(args.av, args.ar, vecs, measured_on=f"{len(vecs)} held-out activations of {where}")
        out = {"fve_baseline": baseline, "n": len(vecs)} | out
    print(json.dumps(out))
    return 0


def register(subparsers) -> None:
    from nla_serve.train.adapter import add_adapter

    add_train(subparsers)
    add_eval(subparsers)
    add_calibrate(subparsers)
    add_adapter(subparsers)
