"""What claim support (``explain.claims``) costs the reconstructor: the same explanations scored
with and without claims, by the shipped default NLA's AR on the embedded default target, on the
CPU of this machine. The explanations are the README's real default-model explanations' shape:
four to five sentences each (``TEXTS``); the vectors are random (the cost does not depend on them).
One JSON on stdout. Run it alone on the machine.

    .venv/bin/python bench/claims_cost.py --n 16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

TEXTS = [
    'This is a user\'s message in a chat. The final token is a line break. The model expects "The" next. '
    'It is asking a question about geography.',
    'The text is a reply from the assistant. The final token is " Paris". The model expects "." next. '
    'The answer names a capital city. It is written in English.',
    'This is a product description. The final token is ",". The model expects " and" next. '
    'It lists features of a device.',
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16, help="explanations per scoring pass")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch

    from nla_serve.nla.checkpoint import load_nla
    from nla_serve.nla.lora import resolve_folder
    from nla_serve.nla.reconstructor import Reconstructor
    from nla_serve.nla.support import score_with_claims
    from nla_serve.config import default_cache_root
    from nla_serve.provision import default_model_dir
    from nla_serve.service import DEFAULT_NLA_DIR

    base = default_model_dir()
    merged = default_cache_root() / "merged"
    ckpt = load_nla(resolve_folder(DEFAULT_NLA_DIR / "av", base=base, cache_dir=merged),
                    resolve_folder(DEFAULT_NLA_DIR / "ar", base=base, cache_dir=merged))
    rec = Reconstructor(ckpt.ar, device="cpu")
    rec.load()
    texts = [TEXTS[i % len(TEXTS)] for i in range(args.n)]
    vectors = torch.randn(args.n, ckpt.d_model, generator=torch.Generator().manual_seed(0))
    baseline = ckpt.fve_baseline or 1.0
    timings: dict[str, list[float]] = {"without_claims": [], "with_claims": []}
    score_with_claims(rec, texts[:2], vectors[:2], baseline, [True, True])  # warm-up
    for _ in range(args.rounds):
        for name, wants in (("without_claims", [False] * args.n), ("with_claims", [True] * args.n)):
            t0 = time.perf_counter()
            _, claims = score_with_claims(rec, texts, vectors, baseline, wants)
            timings[name].append(time.perf_counter() - t0)
    claims_each = sum(len(c) for c in claims if c) / args.n
    off, on = statistics.median(timings["without_claims"]), statistics.median(timings["with_claims"])
    print(json.dumps({"explanations": args.n, "claims_per_explanation": claims_each, "rounds": args.rounds,
                      "seconds_without_claims": round(off, 4), "seconds_with_claims": round(on, 4),
                      "cost_factor": round(on / off, 2), "ar_dtype": str(rec.dtype),
                      "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
